#!/usr/bin/env python3
"""Outbox size after a simulated broker outage: N minutes at F fps of real prediction payloads (QoS 1).

    python scripts/bench/outbox_outage.py [--minutes 10] [--fps 15]

Payloads are made by the agent's own code (BlazeFace on the demo clip, the astronaut's face found in
most frames), plus one health message per 10 s, written through the same Outbox the daemon uses.
Reports rows, payload bytes, the database and WAL size on disk, and put rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--fps", type=float, default=15)
    args = ap.parse_args()

    import cv2

    from agent.inference.loader import load_model
    from agent.inference.pipeline import Prediction
    from agent.messaging.outbox import Outbox
    from agent.messaging.payloads import dumps
    from agent.runtimes.choice import chooser, probe

    path = ROOT / "models/face/blazeface.tflite"
    model = load_model(path, chooser(probe(check_runtimes="first"), path))
    clip = cv2.VideoCapture(str(ROOT / "assets/demo.mp4"))
    payloads = []
    while True:
        ok, frame = clip.read()
        if not ok:
            break
        results, timings = model.infer(frame)
        payloads.append(dumps(Prediction(len(payloads) + 1, "f" * 32, time.time(), time.time(), model.info,
                                         "blazeface", timings, results).to_json()))
    health = b"x" * 1100  # a health message is about 1.1 KB of JSON
    n = int(args.minutes * 60 * args.fps)
    with tempfile.TemporaryDirectory() as tmp:
        box = Outbox(Path(tmp) / "outbox.db", max_mb=50)
        t0 = time.perf_counter()
        total = 0
        for i in range(n):
            p = payloads[i % len(payloads)]
            box.put("edge/cam-01/predictions", p, qos=1)
            total += len(p)
            if i % int(args.fps * 10) == 0:
                box.put("edge/cam-01/health", health, qos=1, retain=True)
                total += len(health)
        took = time.perf_counter() - t0
        db = Path(tmp) / "outbox.db"
        wal = Path(tmp) / "outbox.db-wal"
        print(f"{args.minutes:g} min at {args.fps:g} fps: {box.depth()} messages, {total / 2**20:.2f} MB of payload, "
              f"outbox.db {db.stat().st_size / 2**20:.2f} MB + WAL {wal.stat().st_size / 2**20 if wal.exists() else 0:.2f} MB, "
              f"{n / took:.0f} puts/s, dropped {box.dropped}")
        box.close()


if __name__ == "__main__":
    main()
