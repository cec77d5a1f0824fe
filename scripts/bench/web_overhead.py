#!/usr/bin/env python3
"""What the HTTP server costs the agent, measured side by side in one run.

Two agents on the same model and a synthetic camera: one with ``http.listen: ""``, one with the
server on and nobody connected. They run in alternating turns (each SIGSTOPped while the other
runs), so machine drift hits both alike; per turn the fps comes from the agent's own health
messages. Then RSS of both, idle. Then the server-on agent at ``camera.fps`` 15 with one MJPEG viewer
at 10 fps, in alternating windows with and without the viewer: the viewer's CPU cost per streamed frame.

    .venv/bin/python scripts/bench/web_overhead.py [--model models/face/blazeface.tflite] [--turns 8]

Prints medians and writes nothing. Needs mosquitto (a private one is started on a free port).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from agent.ctl.bench.broker import LocalBroker, free_port  # noqa: E402


class Health:
    def __init__(self, broker: LocalBroker):
        self.samples: dict[str, list[dict]] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("edge/+/health", 0)
        self.client.loop_start()

    def _on(self, c, u, msg) -> None:
        with self.lock:
            self.samples.setdefault(msg.topic.split("/")[1], []).append(json.loads(msg.payload))

    def since(self, device: str, t: float) -> list[dict]:
        with self.lock:
            return [h for h in self.samples.get(device, []) if h["ts"] >= t]


def start(workdir: Path, name: str, broker: LocalBroker, model: str, fps: float, listen: str) -> subprocess.Popen:
    cfg = {"device_id": name, "mqtt": {"url": broker.url}, "camera": {"source": "synthetic", "fps": fps},
           "model": {"path": model}, "health": {"interval_s": 0.5}, "state_dir": str(workdir / name),
           "http": {"listen": listen}, "log_level": "warning"}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen([sys.executable, "-m", "agent.daemon", "--config", str(path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def turn_fps(health: Health, device: str, t0: float) -> float | None:
    hs = health.since(device, t0)
    if len(hs) < 3:
        return None
    a, b = hs[1], hs[-1]  # skip the first: it straddles the resume
    return (b["frames_processed"] - a["frames_processed"]) / max(b["ts"] - a["ts"], 1e-6)


def alternate(health: Health, procs: dict[str, subprocess.Popen], turns: int, turn_s: float) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in procs}
    for p in procs.values():
        p.send_signal(signal.SIGSTOP)
    for i in range(turns):
        for name in (list(procs) if i % 2 == 0 else list(reversed(procs))):
            procs[name].send_signal(signal.SIGCONT)
            t0 = time.time()
            time.sleep(turn_s)
            procs[name].send_signal(signal.SIGSTOP)
            fps = turn_fps(health, name, t0)
            if fps is not None:
                out[name].append(fps)
    for p in procs.values():
        p.send_signal(signal.SIGCONT)
    return out


def wait_http(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/api/v1/latest")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("the agent's HTTP server did not answer")


def viewer(port: int, seconds: float, fps: float) -> int:
    """Read /stream.mjpeg at ``fps`` for ``seconds``; the number of frames received."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", f"/stream.mjpeg?fps={fps}")
    r = c.getresponse()
    frames, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        line = r.fp.readline()
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
            r.fp.readline()
            r.fp.read(n)
            frames += 1
    c.close()
    return frames


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "models/face/blazeface.tflite"))
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--turn-s", type=float, default=3.0)
    ap.add_argument("--window-s", type=float, default=6.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = LocalBroker(work)
        broker.start()
        health = Health(broker)
        port = free_port()
        procs = {"http-off": start(work, "http-off", broker, args.model, 0, ""),
                 "http-on": start(work, "http-on", broker, args.model, 0, f"127.0.0.1:{port}")}
        try:
            wait_http(port)
            time.sleep(3)
            print(f"model {Path(args.model).name}; full rate (camera.fps 0), {args.turns} alternating turns of "
                  f"{args.turn_s:.0f} s each (the other agent stopped)")
            fps = alternate(health, procs, args.turns, args.turn_s)
            off, on = statistics.median(fps["http-off"]), statistics.median(fps["http-on"])
            print(f"  fps  http off {off:7.1f}   http on, no viewer {on:7.1f}   ratio {on / off:.3f}   "
                  f"(per turn, on/off: {', '.join(f'{a / b:.3f}' for a, b in zip(fps['http-on'], fps['http-off'], strict=False))})")
            time.sleep(2)
            rss = {k: [] for k in procs}
            for _ in range(5):
                for k, p in procs.items():
                    rss[k].append(psutil.Process(p.pid).memory_info().rss / 2**20)
                time.sleep(0.5)
            r_off, r_on = statistics.median(rss["http-off"]), statistics.median(rss["http-on"])
            print(f"  RSS  http off {r_off:7.1f} MB   http on, no viewer {r_on:7.1f} MB   +{r_on - r_off:.1f} MB")
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGCONT)
                p.terminate()
            for p in procs.values():
                p.wait(15)
        # One viewer at 10 fps on an agent at 15 fps: CPU per streamed frame.
        on = start(work, "viewer", broker, args.model, 15, f"127.0.0.1:{port}")
        try:
            wait_http(port)
            time.sleep(3)
            proc = psutil.Process(on.pid)
            idle, watched = [], []
            for i in range(6):
                cpu0 = sum(proc.cpu_times()[:2])
                t0 = time.monotonic()
                if i % 2:
                    frames = viewer(port, args.window_s, 10)
                    spent = sum(proc.cpu_times()[:2]) - cpu0
                    watched.append((spent / (time.monotonic() - t0), frames / (time.monotonic() - t0)))
                else:
                    time.sleep(args.window_s)
                    idle.append((sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0))
            base = statistics.median(idle)
            cpu_w = statistics.median(w[0] for w in watched)
            rate = statistics.median(w[1] for w in watched)
            print(f"camera.fps 15, one MJPEG viewer at 10 fps, 3 windows each of {args.window_s:.0f} s with and without")
            print(f"  CPU  no viewer {base * 100:5.1f} % of a core   one viewer {cpu_w * 100:5.1f} %   "
                  f"viewer got {rate:.1f} fps   cost {(cpu_w - base) / max(rate, 1e-6) * 1000:.2f} ms CPU per streamed frame")
        finally:
            on.terminate()
            on.wait(15)
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
