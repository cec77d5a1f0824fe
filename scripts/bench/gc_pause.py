#!/usr/bin/env python3
"""How long a full garbage collection holds the GIL in an agent-sized heap, with and without the freeze.

    python scripts/bench/gc_pause.py [MODEL]

Builds what the daemon has after start-up (its modules, the probe, the model loaded and warmed), then
times gen-2 collections before and after `agent.daemon.freeze_startup_objects()`. While a collection
runs, the frame loop cannot take the GIL back after an invoke: the pause is a gap in the predictions.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def full_collections(n: int = 5) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        gc.collect(2)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def main() -> None:
    import agent.daemon  # noqa: F401 - everything the daemon imports
    from agent.daemon.main import freeze_startup_objects
    from agent.inference.loader import load_model
    from agent.runtimes.choice import chooser, probe

    model_path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models/face/blazeface.tflite"
    model = load_model(model_path, chooser(probe(check_runtimes="first"), model_path))
    before = full_collections()
    tracked = len(gc.get_objects())
    frozen = freeze_startup_objects()
    after = full_collections()
    print(f"{model.info.name}: {tracked} objects tracked after start-up; full collection "
          f"{statistics.median(before):.2f} ms (median of {len(before)}, max {max(before):.2f})")
    print(f"after freezing {frozen} of them: {statistics.median(after):.2f} ms (max {max(after):.2f})")


if __name__ == "__main__":
    main()
