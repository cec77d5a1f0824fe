#!/usr/bin/env python3
"""Fleet simulation: N agents against one mosquitto on this machine, then one group deployment.

    python scripts/fleet_sim.py [--devices 200] [--per-process 50] [--fps 1]

Each simulated device is a full edge-agent (its own MQTT connection, model, frame loop, outbox,
deployer, state dir) on a synthetic camera at --fps. To fit hundreds on one machine, --per-process
agents share a Python process (real devices each have their own CPU; here they share 2 cores).
Reports: time from `agent-ctl deploy --group` to every device `active`, broker and per-agent memory,
and broker messages/s during the deployment.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GROUP = "fleet"


def worker(first: int, count: int, url: str, workdir: Path, fps: float) -> None:
    """Run ``count`` agents in this process until SIGTERM."""
    import logging

    from agent.config import parse_config
    from agent.daemon.agent import Agent

    logging.basicConfig(level=logging.ERROR)
    sys.setswitchinterval(0.005)  # many light threads: the default suits them better
    agents = []
    for i in range(first, first + count):
        cfg = parse_config({
            "device_id": f"sim-{i:04d}", "groups": [GROUP], "mqtt": {"url": url},
            "camera": {"source": "synthetic", "fps": fps, "width": 160, "height": 120},
            "model": {"path": str(ROOT / "models/face/blazeface.onnx")}, "runtime": {"threads": 1},
            "health": {"interval_s": 30}, "deploy": {"probation_s": 5, "validate_timeout_s": 120},
            "state_dir": str(workdir / f"sim-{i:04d}"), "log_level": "error",
        }, environ={})
        agent = Agent(cfg)
        threading.Thread(target=agent.run, daemon=True).start()
        agents.append(agent)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    for a in agents:
        a.stop()
    time.sleep(3)


def rss_mb(pid: int) -> float:
    import psutil

    try:
        p = psutil.Process(pid)
        return (p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))) / 2**20
    except psutil.Error:
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--per-process", type=int, default=50)
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--worker", nargs=4, metavar=("FIRST", "COUNT", "URL", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(int(args.worker[0]), int(args.worker[1]), args.worker[2], Path(args.worker[3]), args.fps)
        return

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    work = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    from agent.ctl.bench.broker import LocalBroker

    broker = LocalBroker(work, extra_conf="sys_interval 1\nmax_queued_messages 10000\n").start()
    port = broker.port
    url = f"mqtt://127.0.0.1:{port}"
    online: set[str] = set()
    sys_counters: dict[str, float] = {}
    lock = threading.Lock()

    def on_msg(c, u, m):
        if m.topic.startswith("$SYS/"):
            try:
                sys_counters[m.topic] = float(m.payload)
            except ValueError:
                pass
            return
        data = json.loads(m.payload) if m.payload else {}
        with lock:
            (online.add if data.get("state") == "online" else online.discard)(m.topic.split("/")[1])

    mon = paho.Client(CallbackAPIVersion.VERSION2)
    mon.on_message = on_msg
    mon.connect("127.0.0.1", port)
    mon.subscribe([("edge/+/status", 1), ("$SYS/broker/messages/received", 0), ("$SYS/broker/messages/sent", 0)])
    mon.loop_start()
    workers = []
    t0 = time.monotonic()
    try:
        for first in range(0, args.devices, args.per_process):
            count = min(args.per_process, args.devices - first)
            workers.append(subprocess.Popen([sys.executable, __file__, "--fps", str(args.fps), "--worker", str(first),
                                             str(count), url, str(work)], cwd=ROOT,
                                            stdout=subprocess.DEVNULL, stderr=open(work / f"w{first}.log", "w")))
        while len(online) < args.devices:
            if time.monotonic() - t0 > args.timeout:
                sys.exit(f"only {len(online)} of {args.devices} devices came online; logs in {work}")
            print(f"\r{len(online):>4}/{args.devices} devices online", end="", file=sys.stderr, flush=True)
            time.sleep(0.5)
        print(f"\r{args.devices} devices online after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        time.sleep(3)
        agents_mb = sum(rss_mb(w.pid) for w in workers)
        broker_mb = rss_mb(broker.proc.pid)
        r0, s0, m0 = (sys_counters.get("$SYS/broker/messages/received", 0),
                      sys_counters.get("$SYS/broker/messages/sent", 0), time.monotonic())
        cfg = work / "ctl.yaml"
        cfg.write_text(f"mqtt:\n  url: {url}\n")
        d0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "agent.ctl", "--config", str(cfg), "deploy",
                            str(ROOT / "models/face/blazeface.tflite"), "--group", GROUP, "--version", "2.0.0",
                            "--timeout", str(args.timeout), "--no-probation-wait"], cwd=ROOT, capture_output=True, text=True)
        took = time.monotonic() - d0
        time.sleep(1.5)  # let $SYS catch up
        r1, s1, m1 = (sys_counters.get("$SYS/broker/messages/received", 0),
                      sys_counters.get("$SYS/broker/messages/sent", 0), time.monotonic())
        last = [line for line in r.stderr.splitlines() if line.strip()][-3:]
        print("\n".join(last), file=sys.stderr)
        print("\n| devices | deploy --group → all active | exit | broker RSS | agent RSS per device | "
              "broker msgs/s in / out during deploy |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        print(f"| {args.devices} | {took:.1f} s | {r.returncode} | {broker_mb:.0f} MB | "
              f"{agents_mb / args.devices:.1f} MB ({args.per_process}/process) | "
              f"{(r1 - r0) / (m1 - m0):.0f} / {(s1 - s0) / (m1 - m0):.0f} |")
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(20)
            except subprocess.TimeoutExpired:
                w.kill()
        mon.loop_stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
