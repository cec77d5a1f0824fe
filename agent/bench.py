"""agent-ctl bench: the bare interpreter and the whole agent on the same model, threads and machine.

Bare: the runtime invoked back to back on a ready input tensor, in a child process (its RSS is its
own). Agent: the daemon as a subprocess (capture at 640x480, preprocess, inference, decode, MQTT
publish to a private mosquitto), measured from a subscriber: predictions/s at full rate, then
capture→subscriber latency and CPU at a fixed 15 fps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else 0.0


def _progress(label: str, done: float, total: float) -> None:
    if not sys.stderr.isatty():
        return
    n = int(30 * min(done / total, 1.0)) if total else 30
    sys.stderr.write(f"\r{label:<28} [{'#' * n}{'-' * (30 - n)}] {min(done, total):4.0f}/{total:.0f} s")
    sys.stderr.flush()


def _done(label: str, text: str) -> None:
    sys.stderr.write(("\r" if sys.stderr.isatty() else "") + f"{label:<28} {text}\n")
    sys.stderr.flush()


# -- bare ----------------------------------------------------------------------------------------

def bare_loop(model_path: Path, threads: int, seconds: float) -> dict:
    """Invoke the runtime back to back on a ready tensor; runs in its own process."""
    import psutil

    from agent import probe
    from agent.camera import SyntheticSource
    from agent.model import load_model

    facts = probe.probe(check_runtimes="first")
    model = load_model(model_path, lambda fmt: probe.choose_runtime(facts, fmt), threads=threads)
    session = model.session
    frame = SyntheticSource(640, 480).read()
    view = getattr(session, "input_view", None)
    if view is not None:  # TFLite: the tensor sits in the interpreter; invoke() alone
        buf = view(0)
        model.preprocessor(frame, buf)
        del buf
        call = lambda: session.run(None)  # noqa: E731
    else:  # ONNX Runtime: its own run() with a feed dict, as a hand-written loop calls it
        tensor, _ = model.preprocessor(frame)
        feed = {session.inputs[0].name: tensor.copy()}
        call = lambda: session.ort.run(None, feed)  # noqa: E731
    for _ in range(10):
        call()
    times = []
    t_end = time.perf_counter() + seconds
    start = time.perf_counter()
    while (t := time.perf_counter()) < t_end:
        call()
        times.append((time.perf_counter() - t) * 1e3)
    elapsed = time.perf_counter() - start
    return {"fps": len(times) / elapsed, "p50_ms": _pct(times, 50), "p99_ms": _pct(times, 99),
            "rss_mb": psutil.Process().memory_info().rss / 2**20, "backend": session.info.backend,
            "accelerator": session.info.accelerator, "frames": len(times)}


def run_bare(model_path: Path, threads: int, seconds: float) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "agent.bench", str(model_path), str(threads), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    t0 = time.monotonic()
    while proc.poll() is None:
        _progress("bare interpreter", time.monotonic() - t0, seconds + 1)
        time.sleep(0.25)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bare run failed: {(err.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.strip().splitlines()[-1])


# -- agent ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """A private mosquitto on a free port of 127.0.0.1, for the bench and the scripts in scripts/bench."""

    def __init__(self, work: Path, extra_conf: str = ""):
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError("bench needs mosquitto (apt-get install mosquitto) for the agent's MQTT publish")
        self.port = _free_port()
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n" + extra_conf
                        + ("user root\n" if os.geteuid() == 0 else ""))
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("the bench's mosquitto did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def run_agent(model_path: Path, threads: int, seconds: float, source: str, fps: float, work: Path,
              broker: LocalBroker, label: str) -> dict:
    """The daemon on ``model_path``; returns rates and latencies seen by a subscriber."""
    import paho.mqtt.client as paho
    import yaml
    from paho.mqtt.enums import CallbackAPIVersion

    dev = f"bench-{int(fps)}"
    cfg = {"device_id": dev, "mqtt": {"url": f"mqtt://127.0.0.1:{broker.port}"},
           "camera": {"source": source, "fps": fps, "width": 640, "height": 480},
           "model": {"path": str(model_path)}, "runtime": {"threads": threads}, "health": {"interval_s": 1},
           "state_dir": str(work / f"state-{dev}"), "log_level": "warning"}
    cfg_path = work / f"{dev}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    arrivals: list[tuple[float, dict]] = []
    health: list[dict] = []
    lock = threading.Lock()

    def on_msg(c, u, m):
        now = time.time()
        data = json.loads(m.payload)
        with lock:
            (health if m.topic.endswith("/health") else arrivals).append((now, data))

    sub = paho.Client(CallbackAPIVersion.VERSION2)
    sub.on_message = on_msg
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe([(f"edge/{dev}/predictions", 0), (f"edge/{dev}/health", 0)])
    sub.loop_start()
    agent = subprocess.Popen([sys.executable, "-m", "agent.daemon", "--config", str(cfg_path)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=open(work / f"{dev}.log", "w"))
    try:
        deadline = time.monotonic() + 60
        while not arrivals:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not start: see {work / (dev + '.log')}")
            time.sleep(0.1)
        time.sleep(2.0)  # warm up: caches, threads, the first health
        with lock:
            start_n = len(arrivals)
        t0 = time.monotonic()
        while (el := time.monotonic() - t0) < seconds:
            _progress(label, el, seconds)
            time.sleep(0.25)
        with lock:
            window = arrivals[start_n:]
            hwin = [h for _, h in health if h["ts"] >= window[0][1]["ts"]] if window else []
        elapsed = window[-1][1]["ts"] - window[0][1]["ts"] if len(window) > 1 else 1.0
        e2e = [(t - p["frame_ts"]) * 1e3 for t, p in window]
        inf = [p["latency_ms"]["inference"] for _, p in window]
        tot = [p["latency_ms"]["total"] for _, p in window]
        return {"fps": (len(window) - 1) / elapsed, "e2e_p50_ms": _pct(e2e, 50), "e2e_p99_ms": _pct(e2e, 99),
                "inference_p50_ms": _pct(inf, 50), "inference_p99_ms": _pct(inf, 99),
                "pipeline_p50_ms": _pct(tot, 50),
                "rss_mb": max((h["rss_mb"] for h in hwin), default=0.0),
                "cpu_percent": statistics.median([h["cpu_percent"] for h in hwin]) if hwin else 0.0,
                "frames_dropped": (hwin[-1]["frames_dropped"] - hwin[0]["frames_dropped"]) if hwin else 0,
                "frames": len(window)}
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        sub.loop_stop()


def bench(model_path: Path, *, seconds: float = 10, threads: int = 0, source: str = "synthetic") -> dict:
    from agent.runtimes import inference_threads

    threads = inference_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    broker = LocalBroker(work)
    try:
        b = run_bare(model_path, threads, seconds)
        _done("bare interpreter", f"{b['fps']:.1f} fps")
        full = run_agent(model_path, threads, seconds, source, 0, work, broker, "agent, full rate")
        _done("agent, full rate", f"{full['fps']:.1f} fps")
        paced = run_agent(model_path, threads, min(seconds, 10), source, 15, work, broker, "agent, 15 fps")
        _done("agent, 15 fps", f"{paced['cpu_percent']:.0f} % CPU, e2e p99 {paced['e2e_p99_ms']:.1f} ms")
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "model": str(model_path), "threads": threads, "backend": b["backend"], "accelerator": b["accelerator"],
        "bare_fps": b["fps"], "agent_fps": full["fps"], "ratio": full["fps"] / b["fps"],
        "overhead_ms_per_frame": 1000 / full["fps"] - 1000 / b["fps"],
        "bare_p50_ms": b["p50_ms"], "bare_p99_ms": b["p99_ms"],
        "e2e_p50_ms_15fps": paced["e2e_p50_ms"], "e2e_p99_ms_15fps": paced["e2e_p99_ms"],
        "inference_p99_ms_15fps": paced["inference_p99_ms"],
        "bare_rss_mb": b["rss_mb"], "agent_rss_mb": full["rss_mb"],
        "cpu_percent_15fps": paced["cpu_percent"], "frames_dropped_full_rate": full["frames_dropped"],
    }


def format_table(r: dict) -> str:
    lines = [
        f"{Path(r['model']).name} on {r['backend']}/{r['accelerator']}, {r['threads']} threads",
        f"  throughput        bare {r['bare_fps']:8.1f} fps   agent {r['agent_fps']:8.1f} fps   ratio {r['ratio']:.3f}",
        f"  agent overhead    {r['overhead_ms_per_frame']:+.3f} ms per frame",
        f"  bare latency      p50 {r['bare_p50_ms']:.2f} ms  p99 {r['bare_p99_ms']:.2f} ms",
        f"  at 15 fps         capture→subscriber p50 {r['e2e_p50_ms_15fps']:.2f} ms  p99 {r['e2e_p99_ms_15fps']:.2f} ms "
        f"(inference p99 {r['inference_p99_ms_15fps']:.2f} ms)",
        f"  RSS               bare {r['bare_rss_mb']:.0f} MB   agent {r['agent_rss_mb']:.0f} MB "
        f"({r['agent_rss_mb'] - r['bare_rss_mb']:+.0f} MB)",
        f"  CPU at 15 fps     {r['cpu_percent_15fps']:.0f} % (of one core)",
    ]
    return "\n".join(lines)


def cmd_bench(args) -> int:
    from agent import ctl

    model = Path(args.model)
    if not model.is_file():
        raise ctl.UsageError(f"model file not found: {model}")
    source = args.source
    if source != "synthetic" and not Path(source).exists():
        raise ctl.UsageError(f"--source: {source} not found (synthetic, or a video file / images:DIR)")
    try:
        result = bench(model, seconds=args.seconds, threads=args.threads, source=source)
    except RuntimeError as exc:
        raise ctl.CtlError(str(exc)) from None
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return ctl.EXIT_OK


def add_parser(sub) -> None:
    sp = sub.add_parser("bench", help="bare interpreter vs the whole agent on one model, side by side")
    sp.add_argument("model")
    sp.add_argument("--seconds", type=float, default=10, help="per measurement (default 10)")
    sp.add_argument("--threads", type=int, default=0, help="inference threads (default: as the agent picks for runtime.threads: 0)")
    sp.add_argument("--source", default="synthetic", help="synthetic (640x480), a video file, or images:DIR")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_bench)


if __name__ == "__main__":  # the bare child: MODEL THREADS SECONDS
    print(json.dumps(bare_loop(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))))
