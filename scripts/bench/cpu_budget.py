#!/usr/bin/env python3
"""Where the CPU goes at full rate: CPU time per frame of each agent thread, the broker and the subscriber.

    python scripts/bench/cpu_budget.py MODEL [--threads 2] [--seconds 8]

Runs the agent as `agent-ctl bench` does at full rate (synthetic 640x480 camera, no fps cap, a
private mosquitto, the bench's bulk subscriber), and reads utime + stime of every thread from /proc
before and after a window. The agent names its threads (ea-frame-loop, ea-capture, ea-publisher, ea-mqtt, ...); a runtime's own
worker threads keep the name of the thread that created them. Linux only.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> collections.Counter:
    """CPU seconds so far of each thread name in process ``pid``."""
    out: collections.Counter = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        out[name] += (int(fields[11]) + int(fields[12])) / TICK
    return out


def main() -> None:
    from agent.ctl.bench.broker import LocalBroker
    from agent.ctl.bench.run import AgentRun

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8)
    args = ap.parse_args()
    if not Path(args.model).is_file():
        sys.exit(f"model file not found: {args.model}")
    work = Path(tempfile.mkdtemp(prefix="cpu-budget-"))
    broker = LocalBroker(work).start()
    agent = None
    try:
        agent = AgentRun(Path(args.model).resolve(), args.threads, "synthetic", 0, work, broker)
        procs = {"agent": agent.proc.pid, "mosquitto": broker.proc.pid, "subscriber": os.getpid()}
        agent.wait_started()
        before = {k: thread_cpu(pid) for k, pid in procs.items()}
        n0, t0 = agent.predictions_seen(), time.monotonic()
        time.sleep(args.seconds)
        after = {k: thread_cpu(pid) for k, pid in procs.items()}
        n1, t1 = agent.predictions_seen(), time.monotonic()
    except RuntimeError as exc:  # the agent did not start: the message names its log, which is kept
        sys.exit(str(exc))
    finally:
        if agent is not None:
            agent.stop()
        broker.stop()
    shutil.rmtree(work, ignore_errors=True)
    frames = n1 - n0
    wall = (t1 - t0) * 1e3 / frames
    print(f"{Path(args.model).name}, {args.threads} threads: {frames / (t1 - t0):.0f} predictions/s, "
          f"{wall:.3f} ms per frame ({os.cpu_count()} cores: {os.cpu_count() * wall:.3f} ms of CPU per frame)")
    print("| process | thread | CPU ms per frame |\n| --- | --- | ---: |")
    total = 0.0
    for proc in procs:
        for name, secs in sorted(after[proc].items(), key=lambda kv: before[proc].get(kv[0], 0) - kv[1]):
            ms = (secs - before[proc].get(name, 0)) * 1e3 / frames
            total += ms
            if ms >= 0.005:
                print(f"| {proc} | {name} | {ms:.3f} |")
    print(f"| all | | {total:.3f} |")


if __name__ == "__main__":
    main()
