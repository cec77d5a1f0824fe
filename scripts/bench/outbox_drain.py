#!/usr/bin/env python3
"""How fast the outbox drains a backlog into a real mosquitto, with no rate limit.

    python scripts/bench/outbox_drain.py [--messages 5000] [--revision REV]

Puts N prediction-sized QoS 1 messages into a fresh outbox (as an outage leaves them), then starts
the DurableSender against a mosquitto of its own and times until a subscriber has all N. With
``--revision`` the same is run on a checkout of that revision first, for a side-by-side figure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def drain(root: Path, n: int) -> str:
    code = f"""
import sys, tempfile, time
sys.path.insert(0, {str(root)!r})
from pathlib import Path
import paho.mqtt.client as paho
from agent.config import MqttConfig
from agent.ctl.bench.broker import LocalBroker
from agent.messaging.delivery import DurableSender
from agent.messaging.link import MqttLink
from agent.messaging.outbox import Outbox
work = Path(tempfile.mkdtemp())
broker = LocalBroker(work).start()
got = [0]
sub = paho.Client(paho.CallbackAPIVersion.VERSION2)
sub.on_message = lambda c, u, m: got.__setitem__(0, got[0] + 1)
sub.connect("127.0.0.1", broker.port); sub.subscribe("bench/#", 1); sub.loop_start(); time.sleep(0.5)
outbox = Outbox(work / "outbox.db")
for i in range({n}):
    outbox.put("bench/predictions", b'{{"seq": %d, "results": "%s"}}' % (i, b"x" * 300))
time.sleep(2.1)  # older than live traffic: a backlog
link = MqttLink(MqttConfig(url=broker.url), "drain-bench")
sender = DurableSender(link, outbox, rate=1e6)
link.start(); link.wait_connected(5)
c0, t0 = time.process_time(), time.monotonic()
sender.start()
while got[0] < {n} and time.monotonic() - t0 < 120:
    time.sleep(0.01)
took = time.monotonic() - t0
print(f"{{got[0]}} of {n} in {{took:.2f}} s: {{got[0] / took:.0f}} messages/s, {{time.process_time() - c0:.2f}} s CPU")
sender.stop(0); link.stop(); broker.stop()
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--revision", help="also run a checkout of this revision, side by side")
    args = ap.parse_args()
    if args.revision:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["git", "worktree", "add", "-q", "--detach", tmp, args.revision], cwd=ROOT, check=True)
            try:
                print(f"{args.revision}: {drain(Path(tmp), args.messages)}")
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", tmp], cwd=ROOT, check=False)
    print(f"this checkout: {drain(ROOT, args.messages)}")


if __name__ == "__main__":
    main()
