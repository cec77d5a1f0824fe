#!/usr/bin/env python3
"""Bare runtime throughput of the benchmark models: no camera, no preprocessing, no decoding.

    python scripts/bench/bare_throughput.py [--dir bench-models] [--threads 2] [--seconds 3] [--rounds 3]

For every .onnx (onnxruntime, CPUExecutionProvider, intra_op_num_threads=--threads) and .tflite
(ai_edge_litert, falling back to tflite_runtime / tensorflow.lite, num_threads=--threads) in --dir:
one input tensor is made once, then the model is run back to back for --seconds, --rounds times
(after a short warm-up); the median round is reported as inferences/s and ms per inference. Each
round also shows how many CPUs other processes kept busy meanwhile (from /proc/stat): on a shared
machine, rounds with that well above 0 are slowed by them and should be rerun.
Needs numpy, onnxruntime and ai-edge-litert: the project's own venv has them, and so does the bench venv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def onnx_runner(path: Path, threads: int) -> Callable[[], object]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    x = np.random.default_rng(0).random([d if isinstance(d, int) and d > 0 else 1 for d in inp.shape],
                                        dtype=np.float32)
    feed = {inp.name: x}
    return lambda: sess.run(None, feed)


def tflite_runner(path: Path, threads: int) -> Callable[[], object]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError:
            from tensorflow.lite import Interpreter  # type: ignore[no-redef]
    interp = Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    (inp,) = interp.get_input_details()
    rng = np.random.default_rng(0)
    dtype = np.dtype(inp["dtype"])
    x = (rng.integers(0, 256, inp["shape"]) if dtype.kind in "iu" else rng.uniform(-1, 1, inp["shape"])).astype(dtype)
    interp.set_tensor(inp["index"], x)
    return interp.invoke


def machine_busy_seconds() -> float | None:
    """CPU-seconds all CPUs have spent busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure(run: Callable[[], object], seconds: float, rounds: int) -> list[tuple[float, float | None]]:
    """(inferences per second, CPUs kept busy by other processes) for each round of back-to-back runs."""
    warm_until = time.perf_counter() + min(1.0, seconds)
    while time.perf_counter() < warm_until:
        run()
    out = []
    for _ in range(rounds):
        busy0, own0 = machine_busy_seconds(), time.process_time()
        n, t0 = 0, time.perf_counter()
        end = t0 + seconds
        while True:
            run()
            n += 1
            t = time.perf_counter()
            if t >= end:
                break
        busy1, own1 = machine_busy_seconds(), time.process_time()
        foreign = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / (t - t0)
        out.append((n / (t - t0), foreign))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "bench-models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("models", nargs="*", help="file names in --dir (default: every .onnx and .tflite)")
    args = parser.parse_args(argv)
    paths = [args.dir / m for m in args.models] or sorted(
        p for p in args.dir.glob("*") if p.suffix in (".onnx", ".tflite"))
    if not paths:
        sys.exit(f"error: no .onnx or .tflite files in {args.dir}; run scripts/bench/make_models.py first")
    print(f"threads={args.threads}, {args.rounds} x {args.seconds:g}s per model, median round; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other load skews the numbers)")
    print(f"{'model':32} {'runtime':14} {'inf/s':>7} {'ms/inf':>7}  rounds: inf/s (CPUs busy with other processes)")
    for path in paths:
        if path.suffix == ".onnx":
            runtime, run = "onnxruntime", onnx_runner(path, args.threads)
        else:
            runtime, run = "tflite", tflite_runner(path, args.threads)
        rounds = measure(run, args.seconds, args.rounds)
        med = statistics.median(r for r, _ in rounds)
        detail = ", ".join(f"{r:.1f}" + ("" if f is None else f" ({f:.2f})") for r, f in rounds)
        print(f"{path.name:32} {runtime:14} {med:7.1f} {1e3 / med:7.1f}  {detail}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
