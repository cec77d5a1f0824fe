"""Deployments end to end: agent-ctl and the agent as subprocesses, a real mosquitto, real models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, REPO, agent_config, wait_until
from deploy_helpers import (
    copy_model,
    ctl,
    hang_on_bright_onnx,
    manifest_for,
    padded_onnx,
    publish_chunks,
    publish_manifest,
    slow_onnx,
)

FIXTURES = Path(__file__).parent / "fixtures" / "models"
FPS = 15


def predictions_keep_flowing(rec, after_seq: int, count: int = 5) -> list[dict]:
    return rec.wait_json("/predictions", lambda p: p["seq"] > after_seq, count=count, timeout=20)


def last_seq(rec) -> int:
    preds = rec.json("/predictions")
    return preds[-1]["seq"] if preds else 0


def events(rec, did: str) -> list[dict]:
    return [e for e in rec.json("/events") if e.get("deployment_id") == did]


@pytest.fixture
def device(broker, recorder_factory, agent_factory, tmp_path):
    """One agent on BlazeFace TFLite at a steady 15 fps, and a recorder of everything it publishes."""

    def make(**overrides):
        deploy = {"probation_s": 2, "validate_timeout_s": 20, **overrides.pop("deploy", {})}
        cfg = agent_config(broker, tmp_path, camera={"source": "synthetic", "fps": FPS}, deploy=deploy, **overrides)
        rec = recorder_factory(broker, f"edge/{cfg['device_id']}/#")
        agent = agent_factory(cfg).start()
        rec.wait_json("/predictions", count=3, timeout=30)
        return cfg, agent, rec

    return make


def test_swap_tflite_to_onnx_and_back_drops_no_frame_and_skips_no_seq(device, tmp_path):
    cfg, agent, rec = device(deploy={"probation_s": 0})  # this test is about the swap, not probation
    onnx_model = copy_model(MODELS / "blazeface.onnx", tmp_path / "v2", "blazeface.onnx")
    r = ctl(agent.config_path, "deploy", str(onnx_model), "--version", "2.0.0", "--timeout", "60")
    assert r.returncode == 0, r.stderr + agent.log()
    assert "active" in r.stderr
    rec.wait_json("/predictions", lambda p: p["model"]["version"] == "2.0.0", count=10)
    status = rec.wait_json("/status", lambda s: s["model"]["version"] == "2.0.0")[-1]
    assert status["backend"] == "onnxruntime" and status["model"]["format"] == "onnx"

    tfl = copy_model(MODELS / "blazeface.tflite", tmp_path / "v3", "blazeface.tflite")
    r = ctl(agent.config_path, "deploy", str(tfl), "--version", "3.0.0", "--timeout", "60")
    assert r.returncode == 0, r.stderr + agent.log()
    rec.wait_json("/predictions", lambda p: p["model"]["version"] == "3.0.0", count=10)

    preds = rec.json("/predictions")
    seqs = [p["seq"] for p in preds]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a seq was skipped"
    versions = [p["model"]["version"] for p in preds]
    swaps = [i for i in range(1, len(preds)) if versions[i] != versions[i - 1]]
    assert [versions[i] for i in swaps] == ["2.0.0", "3.0.0"]
    for i in swaps:
        window = preds[max(0, i - 5): i + 5]
        gaps = [b["ts"] - a["ts"] for a, b in zip(window, window[1:], strict=False)]
        assert max(gaps) < 2 / FPS, f"gap of {max(gaps) * 1000:.0f} ms at the swap"
    health = rec.wait_json("/health", lambda h: h["model"]["version"] == "3.0.0")[-1]
    assert health["frames_dropped"] == 0
    # Only the deployer runs niced: the runtime threads a loaded model brought (ORT's pool, XNNPACK's)
    # serve every frame from now on and must not have inherited the deployer's low priority.
    # Nor the warm-up's SCHED_IDLE (policy 5): that thread ends with the warm-up.
    niced, idle = {}, {}
    for task in Path(f"/proc/{agent.proc.pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        nice, policy = int(fields[16]), int(fields[38])
        if nice:
            niced[task.name] = ((task / "comm").read_text().strip(), nice)
        if policy == os.SCHED_IDLE:
            idle[task.name] = (task / "comm").read_text().strip()
    assert [name for name, _ in niced.values()] == ["ea-deployer"], niced
    assert idle == {}, idle


def test_bad_deployments_are_refused_while_the_old_model_keeps_serving(device, tmp_path, broker):
    cfg, agent, rec = device()
    work = tmp_path / "bad"
    good = (MODELS / "blazeface.onnx").read_bytes()

    def refused(model: Path, state: str, reason: str, *flags: str) -> None:
        before = last_seq(rec)
        r = ctl(agent.config_path, "deploy", str(model), "--timeout", "60", *flags)
        assert r.returncode == 1, r.stderr
        assert f"{state}: " in r.stderr and reason in r.stderr, r.stderr
        after = predictions_keep_flowing(rec, before)
        assert all(p["model"]["version"] == "1.0.0" for p in after)

    # Garbage after the first bytes: still looks like ONNX to the format check, but is no model.
    # (Zeroed weights would still be a valid model: only a golden check made from the good file catches that.)
    corrupt = bytearray(good[:4]) + bytearray(np.random.default_rng(1).integers(0, 256, len(good) - 4, np.uint8))
    copy_model(MODELS / "blazeface.onnx", work / "c", "corrupt.onnx")
    (work / "c" / "corrupt.onnx").write_bytes(bytes(corrupt))
    refused(work / "c" / "corrupt.onnx", "failed", "", "--no-golden")

    cut = copy_model(MODELS / "blazeface.tflite", work / "t", "cut.tflite")
    cut.write_bytes((MODELS / "blazeface.tflite").read_bytes()[:60000])
    refused(cut, "failed", "", "--no-golden")


def test_wrong_hash_fails_in_verifying(device, broker, tmp_path, recorder_factory):
    cfg, agent, rec = device()
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "h", "m.onnx")
    raw, data = manifest_for(model)
    raw["model"]["sha256"] = "0" * 64
    sender = recorder_factory(broker, f"edge/{cfg['device_id']}/events")
    topic = f"edge/{cfg['device_id']}/deploy"
    publish_manifest(sender.client, topic, raw)
    sender.wait_json("/events", lambda e: e["deployment_id"] == raw["deployment_id"] and e["state"] == "received")
    publish_chunks(sender.client, topic, raw, data, range(raw["source"]["chunks"]))
    ev = sender.wait_json("/events", lambda e: e["deployment_id"] == raw["deployment_id"] and e["state"] == "failed")
    assert "sha256 mismatch" in ev[0]["error"]
    predictions_keep_flowing(rec, last_seq(rec))


def test_oversized_model_is_rejected_before_a_byte_is_stored(device, tmp_path):
    cfg, agent, rec = device(deploy={"max_model_mb": 0.1, "probation_s": 2})
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "o", "m.onnx")
    r = ctl(agent.config_path, "deploy", str(model), "--timeout", "30")
    assert r.returncode == 1 and "rejected: " in r.stderr and "at most 0.1 MB" in r.stderr
    assert not list((Path(cfg["state_dir"]) / "staging").glob("*.part"))


def test_signatures_are_required_once_keys_are_trusted(broker, recorder_factory, agent_factory, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    assert ctl(REPO / "config" / "agent.yaml", "keygen", "--out", str(keys / "ops")).returncode == 0
    assert ctl(REPO / "config" / "agent.yaml", "keygen", "--out", str(keys / "intruder")).returncode == 0
    public = (keys / "ops.pub").read_text().strip()
    cfg = agent_config(broker, tmp_path, deploy={"trusted_keys": [public], "probation_s": 1})
    agent = agent_factory(cfg).start()
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/#")
    rec.wait_json("/predictions", count=2, timeout=30)
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "s", "m.onnx")

    r = ctl(agent.config_path, "deploy", str(model), "--timeout", "30")
    assert r.returncode == 1 and "rejected: unsigned deployment" in r.stderr
    r = ctl(agent.config_path, "deploy", str(model), "--timeout", "30", "--sign-key", str(keys / "intruder.key"))
    assert r.returncode == 1 and "rejected: bad signature" in r.stderr

    # signed by the right key, then changed in transit: the signature no longer matches
    raw, data = manifest_for(model, sign_key=str(keys / "ops.key"))
    raw["model"]["version"] = "9.9.9"
    publish_manifest(rec.client, f"edge/{cfg['device_id']}/deploy", raw)
    ev = rec.wait_json("/events", lambda e: e["deployment_id"] == raw["deployment_id"] and e["state"] == "rejected")
    assert "bad signature" in ev[0]["error"]

    r = ctl(agent.config_path, "deploy", str(model), "--version", "2.0.0", "--timeout", "60",
            "--sign-key", str(keys / "ops.key"))
    assert r.returncode == 0, r.stderr


def test_names_that_could_escape_the_store_are_rejected(device, broker, tmp_path):
    cfg, agent, rec = device()
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "p", "m.onnx")
    raw, _ = manifest_for(model)
    topic = f"edge/{cfg['device_id']}/deploy"
    for field, value in (("deployment_id", "../../etc/cron.d/x"), ("name", "../../../tmp/evil")):
        bad = json.loads(json.dumps(raw))
        if field == "name":
            bad["model"]["name"] = value
            bad["deployment_id"] = "escape-test-name"
        else:
            bad["deployment_id"] = value
        publish_manifest(rec.client, topic, bad)
        ev = rec.wait_json("/events", lambda e: e["state"] == "rejected" and "invalid manifest" in (e["error"] or ""),
                           count=1 if field == "deployment_id" else 2)
        assert ev
    assert not any("evil" in str(p) or "cron" in str(p) for p in Path(cfg["state_dir"]).rglob("*"))
    predictions_keep_flowing(rec, last_seq(rec))


@pytest.mark.parametrize("fixture, reason", [("crash.tflite", "crashed"), ("hang.onnx", "did not finish")])
def test_a_model_that_crashes_or_hangs_its_runtime_kills_the_child_not_the_agent(device, tmp_path, fixture, reason):
    cfg, agent, rec = device(deploy={"validate_timeout_s": 5, "probation_s": 2})
    model = copy_model(FIXTURES / fixture, tmp_path / "x", fixture)
    r = ctl(agent.config_path, "deploy", str(model), "--task", "raw", "--no-golden", "--timeout", "60")
    assert r.returncode == 1 and "failed: " in r.stderr and reason in r.stderr, r.stderr
    assert agent.proc.poll() is None
    predictions_keep_flowing(rec, last_seq(rec))


def test_rollback_by_command_restores_the_previous_model(device, tmp_path):
    cfg, agent, rec = device()
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "r", "m.onnx")
    assert ctl(agent.config_path, "deploy", str(model), "--version", "2.0.0").returncode == 0
    listed = ctl(agent.config_path, "models")
    assert listed.returncode == 0 and "* blazeface-short-range 2.0.0" in listed.stdout
    r = ctl(agent.config_path, "rollback")
    assert r.returncode == 0 and "rolled back to blazeface-short-range 1.0.0" in r.stdout, r.stderr
    rec.wait_json("/predictions", lambda p: p["model"]["version"] == "1.0.0" and p["seq"] > 0, count=3)
    # status goes through the outbox (QoS 1), so the first predictions of 1.0.0 can arrive before it
    wait_until(lambda: rec.json("/status")[-1]["model"]["version"] == "1.0.0", 20, what="status 1.0.0")
    assert any(e["state"] == "rolled_back" for e in rec.json("/events"))
    assert "* blazeface-short-range 1.0.0" in ctl(agent.config_path, "models").stdout


def test_a_model_much_slower_than_the_last_fails_probation_and_is_rolled_back(device, tmp_path):
    cfg, agent, rec = device(deploy={"probation_s": 20, "validate_timeout_s": 30})
    slow = slow_onnx(tmp_path / "slow")
    r = ctl(agent.config_path, "deploy", str(slow), "--version", "2.0.0-slow", "--timeout", "60")
    # it passes validation (its outputs are right), goes active, fails probation: deploy waits and says so
    assert r.returncode == 1 and "rolled_back: inference p95" in r.stderr, r.stderr
    ev = rec.wait_json("/events", lambda e: e["state"] == "rolled_back", timeout=40)[0]
    assert "over 3x the previous model" in ev["error"]
    rec.wait_json("/status", lambda s: s["model"]["version"] == "1.0.0" and s["state"] == "online")
    before = last_seq(rec)
    assert all(p["model"]["version"] == "1.0.0" for p in predictions_keep_flowing(rec, before + 2))


def test_a_device_that_connects_later_picks_up_the_retained_manifest(broker, recorder_factory, agent_factory, tmp_path):
    cfg = agent_config(broker, tmp_path, deploy={"probation_s": 1})
    agent = agent_factory(cfg).start()  # known to the broker (a device never seen is refused at once)
    recorder_factory(broker, f"edge/{cfg['device_id']}/status").wait_json("/status", lambda s: s["state"] == "online")
    agent.stop()
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "late", "m.onnx")
    deploying = subprocess.Popen([sys.executable, "-m", "agent.ctl", "--config", str(agent.config_path), "deploy",
                                  str(model), "--version", "2.0.0", "--timeout", "90"],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # the device is off while the manifest is published
    agent.start()
    out, err = deploying.communicate(timeout=120)
    assert deploying.returncode == 0, err + agent.log()
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/predictions")
    rec.wait_json("/predictions", lambda p: p["model"]["version"] == "2.0.0")
    # restarting the device does not apply the same retained deployment again
    agent.stop()
    agent.start()
    time.sleep(4)
    assert agent.log().count("deployment blazeface-short-range-2.0.0") and "already active" not in agent.log()
    applied = [line for line in agent.log().splitlines() if ": activating" in line]
    assert len(applied) == 1, applied


def test_group_deployment_reaches_every_member(broker, recorder_factory, agent_factory, tmp_path):
    agents = []
    for i in range(3):
        cfg = agent_config(broker, tmp_path, groups=["lobby"], device_id=f"lobby-{i}", deploy={"probation_s": 1},
                           state_dir=str(tmp_path / f"state-{i}"), camera={"source": "synthetic", "fps": 5})
        agents.append(agent_factory(cfg, name=f"a{i}").start())
    outsider = agent_config(broker, tmp_path, device_id="garage", state_dir=str(tmp_path / "state-g"),
                            camera={"source": "synthetic", "fps": 5})
    agent_factory(outsider, name="g").start()
    rec = recorder_factory(broker, "edge/+/status")
    wait_until(lambda: {s["device_id"] for s in rec.json("/status") if s["state"] == "online"} >=
               {"lobby-0", "lobby-1", "lobby-2", "garage"}, 40, what="all devices online")
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "g", "m.onnx")
    r = ctl(agents[0].config_path, "deploy", str(model), "--group", "lobby", "--version", "2.0.0", "--timeout", "90")
    assert r.returncode == 0, r.stderr
    assert "committed on 3 device(s)" in r.stderr
    latest = {}
    for s in rec.json("/status"):
        latest[s["device_id"]] = s
    assert all(latest[f"lobby-{i}"]["model"]["version"] == "2.0.0" for i in range(3))
    assert latest["garage"]["model"]["version"] == "1.0.0"


def _resume_setup(broker, recorder_factory, agent_factory, tmp_path):
    cfg = agent_config(broker, tmp_path, deploy={"probation_s": 1, "download_timeout_s": 120})
    agent = agent_factory(cfg).start()
    sender = recorder_factory(broker, f"edge/{cfg['device_id']}/#")
    sender.wait_json("/status", lambda s: s["state"] == "online", timeout=30)
    model = padded_onnx(tmp_path / "big", 3.0)
    raw, data = manifest_for(model, version="2.0.0", no_golden=True)
    n = raw["source"]["chunks"]
    topic = f"edge/{cfg['device_id']}/deploy"
    did = raw["deployment_id"]
    publish_manifest(sender.client, topic, raw)
    sender.wait_json("/events", lambda e: e["deployment_id"] == did and e["state"] == "received")
    first_half = range(n // 2)
    publish_chunks(sender.client, topic, raw, data, first_half)
    have = Path(cfg["state_dir"]) / "staging" / f"{did}.have"
    wait_until(lambda: have.exists() and sum(have.read_bytes()) == len(first_half), 20, what="half the chunks on disk")
    return cfg, agent, sender, raw, data, topic


def _serve_needs_until_active(sender, raw, data, topic, timeout=60) -> list[list[int]]:
    did = raw["deployment_id"]
    served: list[list[int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = events(sender, did)
        if any(e["state"] == "active" for e in evs):
            return served
        assert not any(e["state"] in ("failed", "rejected") for e in evs), evs
        needs = [e["need"] for e in evs if e.get("need")]
        if len(needs) > len(served):
            for need in needs[len(served):]:
                served.append(need)
                publish_chunks(sender.client, topic, raw, data, need)
        time.sleep(0.2)
    raise AssertionError(f"not active after {timeout} s: {events(sender, did)[-3:]}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_transfer_interrupted_by_an_agent_restart_resumes_where_it_stopped(broker, recorder_factory, agent_factory,
                                                                           tmp_path, sig):
    cfg, agent, sender, raw, data, topic = _resume_setup(broker, recorder_factory, agent_factory, tmp_path)
    n = raw["source"]["chunks"]
    agent.signal(sig)
    assert agent.wait(10) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    agent.start()  # picks up the retained manifest again, finds half the chunks on disk
    served = _serve_needs_until_active(sender, raw, data, topic)
    assert served and min(served[0]) >= n // 2, f"asked again for chunks it had: {served[0][:5]}"
    resumed = [e for e in events(sender, raw["deployment_id"]) if e["state"] == "received"]
    assert resumed[-1]["resumed"] is True
    sender.wait_json("/predictions", lambda p: p["model"]["version"] == "2.0.0")


def test_a_transfer_interrupted_by_a_broker_restart_resumes_and_completes(broker, recorder_factory, agent_factory,
                                                                        tmp_path):
    cfg, agent, sender, raw, data, topic = _resume_setup(broker, recorder_factory, agent_factory, tmp_path)
    n = raw["source"]["chunks"]
    broker.stop()
    time.sleep(2)
    broker.start()
    served = _serve_needs_until_active(sender, raw, data, topic)
    assert served and min(served[0]) >= n // 2
    sender.wait_json("/predictions", lambda p: p["model"]["version"] == "2.0.0", timeout=30)


def test_url_source_downloads_with_the_same_checks(device, tmp_path):
    cfg, agent, rec = device(deploy={"allow_file_urls": True})
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "u", "m.onnx")
    served = tmp_path / "www" / "m.onnx"
    served.parent.mkdir()
    shutil.copyfile(model, served)
    r = ctl(agent.config_path, "deploy", str(model), "--version", "2.0.0", "--url", f"file://{served}")
    assert r.returncode == 0, r.stderr
    rec.wait_json("/predictions", lambda p: p["model"]["version"] == "2.0.0")


def test_deploy_with_bad_input_exits_2(tmp_path):
    cfgfile = REPO / "config" / "agent.yaml"
    r = ctl(cfgfile, "deploy", str(tmp_path / "missing.tflite"))
    assert r.returncode == 2 and "model file not found" in r.stderr
    junk = tmp_path / "model.tflite"
    junk.write_bytes(b"GIF89a not a model at all")
    r = ctl(cfgfile, "deploy", str(junk))
    assert r.returncode == 2 and "not a TFLite" in r.stderr and "Traceback" not in r.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(MODELS / "blazeface.onnx", bare / "x.onnx")
    r = ctl(cfgfile, "deploy", str(bare / "x.onnx"))
    assert r.returncode == 2 and "no task" in r.stderr


def test_a_device_never_seen_fails_at_once_with_exit_1_and_cancel_clears_the_manifest(broker, recorder_factory,
                                                                                      tmp_path):
    cfgfile = tmp_path / "ctl.yaml"
    cfgfile.write_text(f"device_id: nobody-home\nmqtt:\n  url: {broker.url}\n")
    t0 = time.monotonic()
    r = ctl(cfgfile, "deploy", str(MODELS / "blazeface.onnx"), "--timeout", "300", "--no-golden")
    assert r.returncode == 1 and "nobody-home: never seen on this broker" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30  # not the 300 s of --timeout
    for command in ("snapshot", "rollback"):
        r = ctl(cfgfile, command, "--timeout", "30")
        assert r.returncode == 1 and f"never seen on this broker (no retained status); check the device id: " \
            f"it cannot answer {command}" in r.stderr, r.stderr
    rec = recorder_factory(broker, "edge/nobody-home/deploy")
    wait_until(lambda: rec.messages, 5, what="the retained manifest")
    assert ctl(cfgfile, "cancel").returncode == 0
    late = recorder_factory(broker, "edge/nobody-home/deploy")
    time.sleep(1.0)
    assert not late.messages  # nothing retained any more for a device that connects later




def test_a_newer_deployment_supersedes_one_stuck_waiting_for_chunks(device, broker, tmp_path):
    cfg, agent, rec = device()
    stale = copy_model(MODELS / "blazeface.onnx", tmp_path / "stale", "m.onnx")
    raw, _ = manifest_for(stale, version="1.5.0", no_golden=True)
    # a retained manifest whose sender is gone: its chunks will never come
    publish_manifest(rec.client, f"edge/{cfg['device_id']}/deploy", raw)
    rec.wait_json("/events", lambda e: e["deployment_id"] == raw["deployment_id"] and e["state"] == "downloading")
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "new", "m.onnx")
    r = ctl(agent.config_path, "deploy", str(model), "--version", "2.0.0", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    old = [e for e in events(rec, raw["deployment_id"]) if e["state"] == "failed"]
    assert old and "superseded" in old[-1]["error"]


def test_a_device_and_group_whose_names_contain_deploy_still_take_deployments(device, tmp_path):
    # Topics are parsed level by level: cutting at the first "/deploy" made edge/deploy-cam-1/deploy
    # look like a foreign topic, and the device ignored every deployment (and its group's) in silence.
    cfg, agent, rec = device(device_id="deploy-cam-1", groups=["deploy-lobby"], deploy={"probation_s": 0})
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "d", "m.onnx")
    r = ctl(agent.config_path, "deploy", str(model), "--version", "2.0.0", "--timeout", "60")
    assert r.returncode == 0, r.stderr
    r = ctl(agent.config_path, "deploy", str(model), "--group", "deploy-lobby", "--version", "3.0.0",
            "--timeout", "60")
    assert r.returncode == 0 and "committed on 1 device(s)" in r.stderr, r.stderr
    rec.wait_json("/predictions", lambda p: p["model"]["version"] == "3.0.0", count=3)


def test_file_urls_are_refused_unless_the_device_allows_them(device, tmp_path):
    cfg, agent, rec = device()
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "f", "m.onnx")
    r = ctl(agent.config_path, "deploy", str(model), "--version", "2.0.0", "--url", f"file://{model}",
            "--timeout", "60")
    assert r.returncode == 1 and "file:// sources are refused on this device" in r.stderr, r.stderr
    assert rec.json("/predictions")[-1]["model"]["version"] == "1.0.0"


def test_a_url_that_trickles_fails_at_download_timeout_and_leaves_nothing_in_staging(device, tmp_path):
    import http.server
    import threading

    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "s", "m.onnx")
    data = model.read_bytes()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # one byte every 0.2 s: each read is quick, the whole would take hours
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg, agent, rec = device(deploy={"download_timeout_s": 3})
        t0 = time.monotonic()
        r = ctl(agent.config_path, "deploy", str(model), "--version", "2.0.0", "--timeout", "60",
                "--url", f"http://127.0.0.1:{server.server_port}/m.onnx")
        took = time.monotonic() - t0
    finally:
        server.shutdown()
    assert r.returncode == 1 and "download timed out" in r.stderr, r.stderr
    assert took < 30, f"took {took:.0f} s"
    staging = Path(cfg["state_dir"]) / "staging"
    assert not [p for p in staging.iterdir() if p.suffix in (".part", ".have")]


def test_manifests_arriving_while_the_deployer_is_busy_are_not_kept_whole(device, tmp_path):
    cfg, agent, rec = device()
    stale = copy_model(MODELS / "blazeface.onnx", tmp_path / "busy", "m.onnx")
    raw, _ = manifest_for(stale, version="1.5.0", no_golden=True)
    topic = f"edge/{cfg['device_id']}/deploy"
    publish_manifest(rec.client, topic, raw)  # its chunks never come: the deployer waits in downloading
    rec.wait_json("/events", lambda e: e["deployment_id"] == raw["deployment_id"] and e["state"] == "downloading")
    rss0 = rec.wait_json("/health")[-1]["rss_mb"]
    junk = b"{" + b" " * (2 * 2**20) + b"}"  # 2 MiB each, over the 256 KiB manifest limit
    for _ in range(60):  # 120 MiB queued behind the download: the queue once kept every byte
        rec.client.publish(topic, junk, qos=1).wait_for_publish(10)
    n = len(rec.json("/health"))
    latest = rec.wait_json("/health", count=n + 3)[-1]
    assert latest["rss_mb"] < rss0 + 60, (rss0, latest["rss_mb"])
    assert agent.proc.poll() is None


def test_trusted_keys_added_by_a_reload_apply_at_once_and_the_rest_is_named(device, tmp_path):
    import yaml

    cfg, agent, rec = device()
    keys = tmp_path / "keys"
    keys.mkdir()
    assert ctl(REPO / "config" / "agent.yaml", "keygen", "--out", str(keys / "ops")).returncode == 0
    changed = yaml.safe_load(agent.config_path.read_text())
    changed["deploy"]["trusted_keys"] = [(keys / "ops.pub").read_text().strip()]
    changed["camera"]["fps"] = 5  # not applied live: the log must say so
    agent.config_path.write_text(yaml.safe_dump(changed))
    agent.signal(signal.SIGHUP)
    wait_until(lambda: "deploy settings applied (1 trusted key(s))" in agent.log(), 15, what="the keys applied")
    assert "reload: camera.fps changed; it applies after a restart" in agent.log()
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "k", "m.onnx")
    r = ctl(agent.config_path, "deploy", str(model), "--version", "2.0.0", "--timeout", "30")
    assert r.returncode == 1 and "rejected: unsigned deployment" in r.stderr, r.stderr
    r = ctl(agent.config_path, "deploy", str(model), "--version", "2.0.0", "--timeout", "60",
            "--sign-key", str(keys / "ops.key"))
    assert r.returncode == 0, r.stderr


def test_an_unverified_message_does_not_abort_a_download(broker, recorder_factory, agent_factory, tmp_path):
    cfg, agent, sender, raw, data, topic = _resume_setup(broker, recorder_factory, agent_factory, tmp_path)
    # invalid, unsigned, naming another id: once enough to abort the half-done download for good
    sender.client.publish(topic, b'{"deployment_id": "x"}', qos=1).wait_for_publish(5)
    time.sleep(1.0)
    _serve_needs_until_active(sender, raw, data, topic)
    assert not [e for e in events(sender, raw["deployment_id"]) if e["state"] == "failed"]


def test_a_broken_copy_claiming_a_real_id_does_not_burn_it(device, tmp_path):
    cfg, agent, rec = device()
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "c", "m.onnx")
    raw, data = manifest_for(model, version="2.0.0", no_golden=True)
    topic = f"edge/{cfg['device_id']}/deploy"
    forged = {**raw, "model": {**raw["model"], "size": -1}}  # fails the schema: unverifiable
    rec.client.publish(topic, json.dumps(forged).encode(), qos=1).wait_for_publish(5)
    rejected = rec.wait_json("/events", lambda e: e["state"] == "rejected" and e.get("deployment_id") == raw[
        "deployment_id"])[0]
    assert rejected["manifest_sha256"]  # names the bytes it was about, so agent-ctl can tell it is not its own
    publish_manifest(rec.client, topic, raw)  # the real one: once "already rejected", never applied
    rec.wait_json("/events", lambda e: e.get("deployment_id") == raw["deployment_id"] and e["state"] == "received")
    publish_chunks(rec.client, topic, raw, data, range(raw["source"]["chunks"]))
    rec.wait_json("/events", lambda e: e.get("deployment_id") == raw["deployment_id"] and e["state"] == "active",
                  timeout=60)


def test_an_older_manifest_delivered_again_does_not_supersede_a_newer_download(broker, recorder_factory,
                                                                               agent_factory, tmp_path):
    # After a broker restart every retained manifest comes again, a group's older one too: only a valid,
    # unfinished, newer manifest may take over the download in progress.
    cfg, agent, sender, raw, data, topic = _resume_setup(broker, recorder_factory, agent_factory, tmp_path)
    older = copy_model(MODELS / "blazeface.onnx", tmp_path / "older", "m.onnx")
    old_raw, _ = manifest_for(older, version="1.5.0", no_golden=True)
    old_raw["created"] = raw["created"] - 3600
    sender.client.publish(topic, json.dumps(old_raw).encode(), qos=1).wait_for_publish(5)
    time.sleep(1.0)
    _serve_needs_until_active(sender, raw, data, topic)
    assert not [e for e in events(sender, raw["deployment_id"]) if e["state"] == "failed"]


def test_a_forged_chunk_is_dropped_and_the_real_one_taken(device, tmp_path):
    cfg, agent, rec = device()
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "fc", "m.onnx")
    raw, data = manifest_for(model, version="2.0.0", no_golden=True)
    assert len(raw["source"]["chunk_sha256"]) == raw["source"]["chunks"] > 1
    topic = f"edge/{cfg['device_id']}/deploy"
    did = raw["deployment_id"]
    publish_manifest(rec.client, topic, raw)
    rec.wait_json("/events", lambda e: e.get("deployment_id") == did and e["state"] == "downloading")
    size = raw["source"]["chunk_size"]
    rec.client.publish(f"{topic}/{did}/chunk/0", bytes(size), qos=1).wait_for_publish(5)  # first, and wrong
    publish_chunks(rec.client, topic, raw, data, range(raw["source"]["chunks"]))
    rec.wait_json("/events", lambda e: e.get("deployment_id") == did and e["state"] == "active", timeout=60)
    assert "chunk 0 does not match its sha256" in agent.log()


def test_a_signed_manifest_is_one_release_for_one_target(broker, recorder_factory, agent_factory, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("old", "new"):  # two trusted keys: rotation
        assert ctl(REPO / "config" / "agent.yaml", "keygen", "--out", str(keys / name)).returncode == 0
    trusted = [(keys / f"{n}.pub").read_text().strip() for n in ("old", "new")]
    cfg = agent_config(broker, tmp_path, groups=["lobby"], deploy={"trusted_keys": trusted, "probation_s": 0})
    dev = cfg["device_id"]
    agent = agent_factory(cfg).start()
    rec = recorder_factory(broker, f"edge/{dev}/#")
    rec.wait_json("/predictions", count=2, timeout=30)
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "t", "m.onnx")
    key = str(keys / "new.key")

    def rejected_for(raw: dict, topic: str) -> str:
        publish_manifest(rec.client, topic, raw)
        ev = rec.wait_json("/events", lambda e: e.get("deployment_id") == raw["deployment_id"]
                           and e["state"] == "rejected")[0]
        return ev["error"]

    own, group = f"edge/{dev}/deploy", "edge/groups/lobby/deploy"
    older, _ = manifest_for(model, {"devices": [dev]}, version="1.1.0", sign_key=key, no_golden=True)
    for_other, _ = manifest_for(model, {"devices": ["cam-a"]}, version="1.2.0", sign_key=key, no_golden=True)
    assert rejected_for(for_other, own) == f"signed for device(s) cam-a, not {dev}"
    for_parking, _ = manifest_for(model, {"group": "parking"}, version="1.3.0", sign_key=key, no_golden=True)
    assert rejected_for(for_parking, group) == "signed for group parking, published on group lobby's topic"
    for_lobby, _ = manifest_for(model, {"group": "lobby"}, version="1.4.0", sign_key=key, no_golden=True)
    assert rejected_for(for_lobby, own) == "signed for group lobby, published on this device's own topic"
    expired, _ = manifest_for(model, {"devices": [dev]}, version="1.5.0", sign_key=key, no_golden=True,
                              expires_in=-60)
    assert rejected_for(expired, own).startswith("expired at ")
    untargeted, _ = manifest_for(model, version="1.6.0", sign_key=key, no_golden=True)
    assert rejected_for(untargeted, own) == "signed manifests must name target (agent-ctl deploy does)"

    r = ctl(agent.config_path, "deploy", str(model), "--version", "2.0.0", "--timeout", "60", "--sign-key", key)
    assert r.returncode == 0, r.stderr  # signed by the second trusted key
    # a replay of an older signed release (a downgrade) is refused: the device keeps the highest counter
    error = rejected_for(older, own)
    assert error.startswith(f"release counter {older['counter']} is not above "), error
    agent.signal(signal.SIGTERM)
    assert agent.wait(15) == 0
    agent.start()  # the counter survives a restart
    rec.wait_json("/status", lambda s: s["state"] == "online" and s["model"]["version"] == "2.0.0")
    older2, _ = manifest_for(model, {"devices": [dev]}, version="1.7.0", sign_key=key, no_golden=True)
    older2["counter"] = older["counter"] + 1  # still below 2.0.0's, re-signed
    from agent.deploy.manifest import load_private_key, sign

    del older2["signature"]
    older2["signature"] = sign(older2, load_private_key(keys / "new.key"))
    assert rejected_for(older2, own).startswith(f"release counter {older2['counter']} is not above ")


def test_with_trusted_keys_a_rollback_must_be_signed_fresh_for_this_device_and_once(broker, recorder_factory,
                                                                                     agent_factory, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    assert ctl(REPO / "config" / "agent.yaml", "keygen", "--out", str(keys / "ops")).returncode == 0
    key = str(keys / "ops.key")
    cfg = agent_config(broker, tmp_path, deploy={"trusted_keys": [(keys / "ops.pub").read_text().strip()],
                                                 "probation_s": 0})
    dev = cfg["device_id"]
    agent = agent_factory(cfg).start()
    rec = recorder_factory(broker, f"edge/{dev}/#")
    rec.wait_json("/predictions", count=2, timeout=30)
    model = copy_model(MODELS / "blazeface.onnx", tmp_path / "rb", "m.onnx")
    assert ctl(agent.config_path, "deploy", str(model), "--version", "2.0.0", "--sign-key", key,
               "--timeout", "60").returncode == 0

    r = ctl(agent.config_path, "rollback", "--timeout", "10")
    assert r.returncode == 1 and "rollback failed: unsigned rollback" in r.stderr, r.stderr
    assert "agent-ctl rollback --sign-key FILE" in r.stderr

    from agent.ctl.device import signed_body

    for_other = signed_body("rollback", "r-other", "cam-elsewhere", Path(key))
    rec.client.publish(f"edge/{dev}/cmd", json.dumps(for_other).encode(), qos=1).wait_for_publish(5)
    reply = rec.wait_json("/cmd/response", lambda m: m.get("request_id") == "r-other")[0]
    assert reply["ok"] is False and "signed for device 'cam-elsewhere'" in reply["error"]

    r = ctl(agent.config_path, "rollback", "--sign-key", key, "--timeout", "10")
    assert r.returncode == 0 and "rolled back to blazeface-short-range 1.0.0" in r.stdout, r.stderr
    signed = next(m for m in (json.loads(p) for t, p, _ in rec.messages if t.endswith("/cmd"))
                  if m.get("signature") and m.get("device") == dev)  # what agent-ctl sent, as captured
    rec.client.publish(f"edge/{dev}/cmd", json.dumps(signed).encode(), qos=1).wait_for_publish(5)  # a replay
    replies = rec.wait_json("/cmd/response", lambda m: m.get("request_id") == signed["request_id"], count=2)
    assert replies[-1]["ok"] is False and "already run (a replay)" in replies[-1]["error"]


def test_rollback_to_a_named_stored_version(device, tmp_path):
    cfg, agent, rec = device(deploy={"probation_s": 0})
    for version in ("2.0.0", "3.0.0"):
        model = copy_model(MODELS / "blazeface.tflite", tmp_path / version, "m.tflite")
        model.write_bytes(model.read_bytes() + version.encode())  # after the flatbuffer: other bytes, same model
        assert ctl(agent.config_path, "deploy", str(model), "--version", version, "--no-golden",
                   "--timeout", "60").returncode == 0
    r = ctl(agent.config_path, "rollback", "--to", "9.9.9")
    assert r.returncode == 1 and "no stored version '9.9.9' to roll back to (stored: 2.0.0, 1.0.0)" in r.stderr, r.stderr
    r = ctl(agent.config_path, "rollback", "--to", "1.0.0")
    assert r.returncode == 0 and "rolled back to blazeface-short-range 1.0.0" in r.stdout, r.stderr
    rec.wait_json("/predictions", lambda p: p["model"]["version"] == "1.0.0" and p["seq"] > 0, count=3)
    assert "* blazeface-short-range 1.0.0" in ctl(agent.config_path, "models").stdout


def test_a_model_that_hangs_on_real_frames_fails_probation_even_across_a_kill_9(device, tmp_path):
    cfg, agent, rec = device(deploy={"probation_s": 3})
    hang = hang_on_bright_onnx(tmp_path / "hang")  # answers on the zeros of validation and warm-up
    r = ctl(agent.config_path, "deploy", str(hang), "--version", "2.0.0-hang", "--no-golden", "--no-probation-wait",
            "--timeout", "60")
    assert r.returncode == 0 and "active on 1 device(s)" in r.stderr, r.stderr
    agent.signal(signal.SIGKILL)  # in probation: once that skipped it for good
    agent.wait(10)
    agent.start()  # the stored model is the hanging one: its probation resumes and it serves no frame
    ev = rec.wait_json("/events", lambda e: e["state"] == "rolled_back", timeout=60)[-1]
    assert "only 0 frame(s) served" in ev["error"] and ev["model"]["version"] == "1.0.0", ev
    assert agent.stop() is not None  # its frame loop is stuck in the runtime for good: a restart clears it
    agent.start()
    rec.wait_json("/predictions", lambda p: p["model"]["version"] == "1.0.0" and p["seq"] > 3, timeout=30)


def test_a_heavier_model_on_purpose_passes_with_its_own_probation_terms(device, tmp_path):
    cfg, agent, rec = device(deploy={"probation_s": 20, "validate_timeout_s": 30})
    slow = slow_onnx(tmp_path / "slow")  # many times slower: rolled back under the default terms (test above)
    t0 = time.monotonic()
    r = ctl(agent.config_path, "deploy", str(slow), "--version", "2.0.0-slow", "--timeout", "60",
            "--probation-s", "3", "--latency-allowance", "1000")
    assert r.returncode == 0 and "committed on 1 device(s)" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 20  # its own 3 s of probation, not the device's 20
    ev = rec.wait_json("/events", lambda e: e["state"] == "committed")[-1]
    assert ev["model"]["version"] == "2.0.0-slow" and "passed probation" in ev["note"]


def test_a_rollback_on_a_device_whose_frame_loop_is_stuck_says_so(device, tmp_path):
    cfg, agent, rec = device(deploy={"probation_s": 300})
    hang = hang_on_bright_onnx(tmp_path / "hang")
    r = ctl(agent.config_path, "deploy", str(hang), "--version", "2.0.0-hang", "--no-golden", "--no-probation-wait",
            "--timeout", "60")
    assert r.returncode == 0, r.stderr
    time.sleep(2)  # the first real frame: the runtime hangs in it for hours
    r = ctl(agent.config_path, "rollback", "--timeout", "60")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rolled back to blazeface-short-range 1.0.0, but the frame loop has not turned for" in r.stderr, r.stderr


def test_deploying_the_model_already_running_is_committed_at_once(device, tmp_path):
    cfg, agent, rec = device(deploy={"probation_s": 300})
    model = copy_model(MODELS / "blazeface.tflite", tmp_path / "same", "m.tflite")  # name 1.0.0, same bytes
    t0 = time.monotonic()
    r = ctl(agent.config_path, "deploy", str(model), "--version", "1.0.0", "--timeout", "60")
    assert r.returncode == 0 and "committed on 1 device(s)" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30  # no probation: nothing changed
    assert rec.wait_json("/events", lambda e: e["state"] == "committed")[-1]["note"] == "this model is already running"
