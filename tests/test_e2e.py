"""The agent as a user runs it, against a real mosquitto: predictions, status, health, LWT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MODELS, REPO, Broker, agent_config, wait_until

from agent.inference.modelfile import file_sha256


def _iou(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize("model_file, backend", [("blazeface.tflite", "tflite"), ("blazeface.onnx", "onnxruntime")])
def test_face_on_a_real_photo_is_published_where_it_is(broker, recorder_factory, agent_factory, tmp_path,
                                                       face_frames, model_file, backend):
    folder, face_box = face_frames
    cfg = agent_config(broker, tmp_path, camera={"source": f"images:{folder}", "fps": 10},
                       model={"path": str(MODELS / model_file)})
    dev = cfg["device_id"]
    rec = recorder_factory(broker, f"edge/{dev}/#")
    agent = agent_factory(cfg).start()

    preds = rec.wait_json("/predictions", count=5, timeout=30)
    for p in preds[:5]:
        assert p["task"] == "blazeface"
        fmt = model_file.rsplit(".", 1)[1]  # the .tflite and .onnx builds share name and version
        assert p["model"] == {"name": "blazeface-short-range", "version": "1.0.0", "format": fmt,
                              "digest": file_sha256(MODELS / model_file)[:12]}
        assert set(p["latency_ms"]) == {"preprocess", "inference", "postprocess", "total"}
        assert p["frame_ts"] <= p["ts"]
        faces = [r for r in p["results"] if r["label"] == "face"]
        assert len(faces) == 1, p["results"]
        assert faces[0]["score"] > 0.8
        assert _iou(faces[0]["box"], face_box) > 0.7, (faces[0]["box"], face_box)
    seqs = [p["seq"] for p in preds]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert len({p["boot_id"] for p in preds}) == 1

    status = rec.wait_json("/status", lambda m: m["state"] == "online")[0]
    assert status["backend"] == backend
    assert status["model"]["sha256"] and status["model"]["format"] == model_file.rsplit(".", 1)[1]
    assert status["model"]["task"] == "blazeface"
    assert status["platform"]["arch"]

    health = rec.wait_json("/health", lambda m: m["frames_processed"] > 0)[0]
    for key in ("fps", "latency_ms", "frames_captured", "frames_processed", "frames_dropped", "cpu_percent",
                "rss_mb", "temperature_c", "throttled", "uptime_s", "model"):
        assert key in health
    assert health["camera"]["state"] == "streaming"
    assert health["latency_ms"]["inference"]["p99"] >= health["latency_ms"]["inference"]["p50"] > 0
    # the agent's threads carry names that top -H, ps -L and py-spy show
    names = {(t / "comm").read_text().strip() for t in Path(f"/proc/{agent.proc.pid}/task").iterdir()}
    assert {"ea-capture", "ea-frame-loop", "ea-publisher", "ea-mqtt", "ea-deployer"} <= names, names
    assert agent.stop() == 0


def test_kill_9_leaves_status_offline_through_the_last_will(broker, recorder_factory, agent_factory, tmp_path):
    cfg = agent_config(broker, tmp_path)
    dev = cfg["device_id"]
    rec = recorder_factory(broker, f"edge/{dev}/status")
    agent = agent_factory(cfg).start()
    rec.wait_json("/status", lambda m: m["state"] == "online")
    agent.signal(signal.SIGKILL)
    agent.wait(5)
    # mosquitto publishes the will when the keepalive lapses or the socket closes: here, at once.
    rec.wait_json("/status", lambda m: m["state"] == "offline", timeout=15)
    late = recorder_factory(broker, f"edge/{dev}/status")  # the retained status a newcomer sees
    assert late.wait_json("/status")[-1]["state"] == "offline"


def test_broker_down_at_start_does_not_stop_the_agent(tmp_path, recorder_factory, agent_factory):
    broker = Broker(tmp_path)  # not started yet
    cfg = agent_config(broker, tmp_path)
    agent = agent_factory(cfg).start()
    time.sleep(3)
    assert agent.proc.poll() is None, agent.log()
    broker.start()
    try:
        rec = recorder_factory(broker, f"edge/{cfg['device_id']}/#")
        rec.wait_json("/predictions", count=3, timeout=40)
        assert rec.wait_json("/status")[-1]["state"] == "online"
    finally:
        assert agent.stop() == 0
        broker.stop()


def test_sigterm_exits_0_quickly_and_publishes_offline(broker, recorder_factory, agent_factory, tmp_path):
    cfg = agent_config(broker, tmp_path)
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/status")
    agent = agent_factory(cfg).start()
    rec.wait_json("/status", lambda m: m["state"] == "online")
    t0 = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    took = time.monotonic() - t0
    assert took < 5, f"took {took:.1f} s to stop"
    offline = rec.wait_json("/status", lambda m: m["state"] == "offline")[-1]
    assert offline["model"]["name"] == "blazeface-short-range"  # a clean stop says what was running


def test_agent_ctl_status_and_watch_read_the_api(broker, agent_factory, tmp_path):
    cfg = agent_config(broker, tmp_path)
    dev = cfg["device_id"]
    agent = agent_factory(cfg).start()
    ctl = [sys.executable, "-m", "agent.ctl", "--config", str(agent.config_path)]
    watch = subprocess.run([*ctl, "watch", "--device", dev, "--count", "3", "--seconds", "30"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert watch.returncode == 0, watch.stderr
    lines = watch.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{dev} #") for line in lines)

    def status_ok():
        r = subprocess.run([*ctl, "status", "--json"], capture_output=True, text=True, cwd=REPO, timeout=30)
        import json

        data = json.loads(r.stdout) if r.returncode == 0 else {}
        return data if data.get(dev, {}).get("health") else None

    data = wait_until(status_ok, 20, interval=0.5, what="status and health from agent-ctl")
    assert data[dev]["status"]["state"] == "online"
    table = subprocess.run([*ctl, "status"], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert table.returncode == 0 and dev in table.stdout and "online" in table.stdout
    missing = subprocess.run([*ctl, "status", "--device", "no-such-device", "--wait", "0.5"],
                             capture_output=True, text=True, cwd=REPO, timeout=30)
    assert missing.returncode == 1 and "no-such-device" in missing.stderr


def test_agent_ctl_reports_an_unreachable_broker_with_exit_1(tmp_path):
    from conftest import free_port

    r = subprocess.run([sys.executable, "-m", "agent.ctl", "--broker", f"mqtt://127.0.0.1:{free_port()}", "status"],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 1
    assert "cannot reach the broker" in r.stderr and "Traceback" not in r.stderr


def test_agent_ctl_bench_measures_bare_and_agent_side_by_side():
    r = subprocess.run([sys.executable, "-m", "agent.ctl", "bench", str(MODELS / "blazeface.tflite"),
                        "--seconds", "2", "--threads", "1", "--json"],  # 2 s: health (1 s) lands inside
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["backend"] == "tflite" and res["threads"] == 1
    assert res["default_fps"] > 0 and res["bare_fps"] > 0 and res["agent_fps"] > 0
    # the ratio is against the loop a user would write: the runtime's defaults, nothing of the agent loaded
    assert res["ratio"] == pytest.approx(res["agent_fps"] / res["default_fps"])
    assert res["ratio_agent_settings"] == pytest.approx(res["agent_fps"] / res["bare_fps"])
    assert res["overhead_ms_per_frame"] == pytest.approx(1000 / res["agent_fps"] - 1000 / res["default_fps"])
    assert res["runtime"] in ("ai_edge_litert", "tflite_runtime") and res["default_imports_of_the_agent"] == []
    assert 0 < res["default_rss_mb"] < res["agent_rss_mb"]
    # at 15 fps the subscriber saw the predictions after their frames were captured
    assert 0 < res["e2e_p50_ms_15fps"] <= res["e2e_p99_ms_15fps"]
    assert res["bare_rss_mb"] > 0 and res["agent_rss_mb"] > 0 and res["cpu_percent_15fps"] > 0
    # full rate: bare and agent took turns, one 1 s slice each per second asked for
    assert res["slices"] == 2 and res["agent_inference_p50_ms"] > 0 and res["bare_p50_ms"] > 0
    assert len(res["default_slice_fps"]) == len(res["bare_slice_fps"]) == len(res["agent_slice_fps"]) == 2
    assert min(res["agent_slice_fps"]) > 0 and min(res["bare_slice_fps"]) > 0 and min(res["default_slice_fps"]) > 0

    missing = subprocess.run([sys.executable, "-m", "agent.ctl", "bench", "no-such-model.tflite"],
                             capture_output=True, text=True, cwd=REPO, timeout=30)
    assert missing.returncode == 2 and "model file not found" in missing.stderr and "Traceback" not in missing.stderr


def test_bench_bulk_subscriber_parses_what_paho_published(broker):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.ctl.bench.subscriber import BulkSubscriber

    pub = paho.Client(CallbackAPIVersion.VERSION2)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    pub.publish("b/health", b"old", retain=True).wait_for_publish(5)  # retained before: not this run's
    sub = BulkSubscriber(broker.port, ["b/predictions", "b/health"])
    try:
        sizes = [1, 127, 128, 300, 16383, 16384, 70000]  # 1-, 2- and 3-byte remaining lengths
        for n in sizes:
            pub.publish("b/predictions", bytes([n % 251]) * n).wait_for_publish(5)
        pub.publish("b/other", b"not subscribed").wait_for_publish(5)
        pub.publish("b/health", b"new").wait_for_publish(5)
        got = wait_until(lambda: m if len(m := sub.messages()) == len(sizes) + 1 else None, 10,
                         what="every message parsed")
    finally:
        sub.close()
        pub.publish("b/health", b"", retain=True).wait_for_publish(5)
        pub.loop_stop()
    assert [(t, len(p)) for _, t, p in got] == [("b/predictions", n) for n in sizes] + [("b/health", 3)]
    assert all(p == bytes([n % 251]) * n for (_, _, p), n in zip(got, sizes, strict=False))
    assert got[-1][2] == b"new" and all(abs(a - time.time()) < 10 for a, _, _ in got)


def test_mqtt_3_1_1_works_too_last_will_included(broker, recorder_factory, agent_factory, tmp_path):
    cfg = agent_config(broker, tmp_path, mqtt={"url": broker.url, "protocol": "3.1.1"})
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/#")
    agent = agent_factory(cfg).start()
    rec.wait_json("/predictions", count=3, timeout=30)
    assert rec.wait_json("/status")[-1]["state"] == "online"
    agent.signal(signal.SIGKILL)
    agent.wait(5)
    rec.wait_json("/status", lambda m: m["state"] == "offline", timeout=15)


def test_make_run_starts_the_bundled_default_and_says_where_predictions_go(broker, recorder_factory, tmp_path):
    # scripts/run.sh (what `make run` runs) reads the config through the package before it starts the
    # agent; an import it names that moved would stop a new user's first command.
    import os

    rec = recorder_factory(broker, "edge/make-run/#")
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT__STATE_DIR"}
    env.update({"VENV": str(Path(sys.executable).parent.parent), "EDGE_AGENT__MQTT__URL": broker.url,
                "EDGE_AGENT__DEVICE_ID": "make-run"})
    proc = subprocess.Popen(["bash", "scripts/run.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    def predicting() -> bool:
        if proc.poll() is not None:  # e.g. the config could not be read: fail now, with its output
            raise AssertionError(f"scripts/run.sh exited with {proc.returncode}:\n{proc.stdout.read()}")
        return len(rec.json("/predictions")) >= 3

    try:
        wait_until(predicting, 40, what="predictions from make run's agent")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        out = proc.communicate(timeout=20)[0]
    assert "run: predictions go to edge/make-run/predictions on " + broker.url in out, out
    # the demo's state stays in the checkout (make clean removes it), also as root
    assert f"run: state (model store, outbox, journal) in {REPO}/.state" in out, out
    assert proc.returncode == 0, out


def test_what_the_agent_writes_is_for_its_user_and_group_even_under_a_loose_umask(broker, recorder_factory,
                                                                                   agent_factory, tmp_path):
    import os

    cfg = agent_config(broker, tmp_path, health={"interval_s": 0.5})
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/health")
    old = os.umask(0o022)  # a shell's usual umask: the agent run by hand, outside the unit's UMask=0027
    try:
        agent = agent_factory(cfg).start()
    finally:
        os.umask(old)
    rec.wait_json("/health", count=2)  # health goes through the outbox: its database exists by now
    assert agent.stop() == 0
    written = [Path(cfg["state_dir"]), *Path(cfg["state_dir"]).rglob("*")]
    assert any(p.name == "outbox.db" for p in written)
    loose = {str(p): oct(p.stat().st_mode & 0o777) for p in written if p.stat().st_mode & 0o027}
    assert not loose, loose


def test_a_second_device_with_the_same_device_id_is_named_in_the_log_and_health(broker, recorder_factory,
                                                                                 agent_factory, tmp_path):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    cfg = agent_config(broker, tmp_path, health={"interval_s": 0.5})
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/health")
    agent = agent_factory(cfg).start()
    rec.wait_json("/health")
    clone = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-agent-{cfg['device_id']}",
                        protocol=paho.MQTTv5)  # what a cloned SD card connects as
    clone.connect(broker.host, broker.port)
    clone.loop_start()
    try:
        health = rec.wait_json("/health", lambda h: h["mqtt"].get("taken_over", 0) >= 1)[-1]
    finally:
        clone.loop_stop()
        clone.disconnect()
    assert health["mqtt"]["taken_over"] >= 1
    wait_until(lambda: "two devices with one device_id?" in agent.log(), 10, what="the warning in the log")
