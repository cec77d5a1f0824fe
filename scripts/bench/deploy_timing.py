#!/usr/bin/env python3
"""Deploy timing and hot-swap gaps, measured end to end on this machine.

Starts a private mosquitto and one agent (synthetic camera), then for each model size runs
`agent-ctl deploy` and reports: seconds from the command to `active`, the largest gap between two
predictions around the swap, frames dropped during the swap, and whether any seq was skipped.

    python scripts/bench/deploy_timing.py [--fps 15] [--runs 3] [--sizes 0.2,14]
    python scripts/bench/deploy_timing.py --fps 0 --model bench-models/mobilenetv2_224.onnx

fps 0 means full rate (the model as fast as it goes). Reports medians over --runs. By default the
agent serves the bundled BlazeFace TFLite and is sent BlazeFace models of --sizes; with --model it
serves that model and is sent a changed copy of it (a new model of the same size and speed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
MODELS = ROOT / "models" / "face"


def model_of_size(work: Path, mb: float, tag: str) -> Path:
    """BlazeFace ONNX padded to ``mb`` megabytes with an unused weight tensor (a real, loadable model).

    Weights, not metadata: onnxruntime parses weights with the GIL released, but hands the metadata
    map to Python in one piece, so megabytes of padding there would stall the frame loop as no real
    model of that size does.
    """
    d = work / tag
    d.mkdir(parents=True)
    if mb <= 0.25:
        shutil.copyfile(MODELS / "blazeface.tflite", d / "m.tflite")
        path = d / "m.tflite"
    else:
        m = onnx.load(str(MODELS / "blazeface.onnx"))
        n = int(mb * 2**20 - (MODELS / "blazeface.onnx").stat().st_size) // 4
        pad = np.random.default_rng(len(tag)).standard_normal(n).astype(np.float32)
        m.graph.initializer.append(numpy_helper.from_array(pad, "padding"))
        path = d / "m.onnx"
        onnx.save(m, str(path))
    (d / "model.yaml").write_text((MODELS / "model.yaml").read_text())
    return path


def variant_of(work: Path, model: Path, tag: str) -> Path:
    """A different file (so a real deploy and swap) with ``model``'s size and speed: ONNX with one weight
    nudged, TFLite with a few bytes appended."""
    d = work / tag
    d.mkdir(parents=True)
    path = d / model.name
    if model.suffix == ".onnx":
        m = onnx.load(str(model))
        init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        arr = numpy_helper.to_array(init).copy()
        arr.flat[len(tag)] += 1e-3
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(m, str(path))
    else:  # TFLite reads the flatbuffer and ignores bytes after it (where metadata zips go): append some
        path.write_bytes(model.read_bytes() + f"deploy_timing {tag}".encode().ljust(32))
    for yml in (model.with_suffix(".yaml"), model.parent / "model.yaml"):
        if yml.is_file():
            (d / (path.stem + ".yaml")).write_text(yml.read_text())
            break
    return path


def _largest_gap(stamps: list[float]) -> float:
    return max(b - a for a, b in zip(stamps, stamps[1:], strict=False)) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fps", type=float, default=15)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="0.2,14", help="model sizes in MB")
    ap.add_argument("--model", type=Path, help="serve this model and deploy copies of it (instead of BlazeFace)")
    ap.add_argument("--verbose", action="store_true", help="print the intervals around each swap")
    args = ap.parse_args()
    serving = args.model.resolve() if args.model else MODELS / "blazeface.tflite"
    if not serving.is_file():
        sys.exit(f"deploy_timing: model file not found: {serving}")
    work = Path(tempfile.mkdtemp(prefix="deploy-timing-"))
    from agent.ctl.bench.broker import LocalBroker

    broker = LocalBroker(work).start()
    port = broker.port
    cfg = {"device_id": "bench", "mqtt": {"url": f"mqtt://127.0.0.1:{port}"},
           "camera": {"source": "synthetic", "fps": args.fps}, "health": {"interval_s": 1},
           "deploy": {"probation_s": 0}, "state_dir": str(work / "state"),
           "model": {"path": str(serving)}}
    cfg_path = work / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    agent = subprocess.Popen([sys.executable, "-m", "agent.daemon", "--config", str(cfg_path)], cwd=ROOT,
                             stdout=open(work / "agent.log", "w"), stderr=subprocess.STDOUT)
    from agent.ctl.bench.subscriber import BulkSubscriber

    # Reads its socket in bulk: paho's subscriber would take ~0.2 ms of CPU per message from the two
    # cores the agent runs on, and at full rate that is a core's worth of jitter in what we measure.
    sub = BulkSubscriber(port, ["edge/bench/predictions", "edge/bench/health"])
    seen = [0, [], []]  # messages parsed so far, predictions, health

    def messages() -> tuple[list[dict], list[dict]]:
        raw = sub.messages()
        for _, topic, payload in raw[seen[0]:]:
            (seen[1] if topic.endswith("predictions") else seen[2]).append(json.loads(payload))
        seen[0] = len(raw)
        return seen[1], seen[2]

    try:
        while len(messages()[0]) < 20:
            time.sleep(0.1)
        rows = []
        sizes = [round(serving.stat().st_size / 2**20, 1)] if args.model else [float(s) for s in args.sizes.split(",")]
        for mb in sizes:
            took, gaps, quiet_gaps, intervals, dropped, skipped = [], [], [], [], [], 0
            for run in range(args.runs):
                tag = f"{mb}-{run}"
                model = variant_of(work, serving, tag) if args.model else model_of_size(work, mb, tag)
                time.sleep(1.5)  # a quiet stretch before the deploy: the machine's own gaps, for comparison
                preds, health = messages()
                start_idx = len(preds)
                drop0 = health[-1]["frames_dropped"] if health else 0
                quiet = [p["ts"] for p in preds if p["ts"] >= preds[-1]["ts"] - 1.5]
                t0 = time.monotonic()
                r = subprocess.run([sys.executable, "-m", "agent.ctl", "--config", str(cfg_path), "deploy", str(model),
                                    "--version", f"{mb}-{run}", "--timeout", "300"], cwd=ROOT, capture_output=True,
                                   text=True)
                took.append(time.monotonic() - t0)
                if r.returncode != 0:
                    sys.exit(f"deploy failed: {r.stderr}")
                time.sleep(1.5)
                preds, health = messages()
                window = preds[start_idx:]
                drop1 = health[-1]["frames_dropped"]
                seqs = [p["seq"] for p in window]
                skipped += sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b != a + 1)
                swap = next(i for i, p in enumerate(window) if p["model"]["version"] == f"{mb}-{run}")
                around = [p["ts"] for p in window[max(0, swap - 10): swap + 10]]
                gaps.append(_largest_gap(around))
                if args.verbose:  # each interval around the swap, ms; | marks the new model's first prediction
                    ivs = [f"{(b - a) * 1000:.1f}" for a, b in zip(around, around[1:], strict=False)]
                    print("    intervals:", " ".join(ivs[:min(swap, 10) - 1]), "|", " ".join(ivs[min(swap, 10) - 1:]),
                          file=sys.stderr)
                # The same measure with no deploy: the largest gap in 20 consecutive predictions, over the
                # quiet stretch before (median over its windows). On a shared VM this is well above 1 interval.
                quiet_gaps.append(statistics.median(_largest_gap(quiet[i:i + 20]) for i in range(0, len(quiet) - 20, 10)))
                intervals.append(statistics.median(b - a for a, b in zip(quiet, quiet[1:], strict=False)) * 1000)
                dropped.append(drop1 - drop0)
                print(f"  {mb:>5} MB run {run + 1}: {took[-1]:.2f} s to active, largest gap at the swap {gaps[-1]:.1f} ms "
                      f"(no deploy: {quiet_gaps[-1]:.1f} ms; interval {intervals[-1]:.2f} ms), dropped {dropped[-1]}",
                      file=sys.stderr)
            rows.append((mb, statistics.median(took), statistics.median(gaps), statistics.median(quiet_gaps),
                         statistics.median(intervals), max(dropped), skipped))
        camera = f"{args.fps:g} fps" if args.fps else "full rate"
        print(f"\ncamera {camera}, median of {args.runs} runs; a frame interval is the median interval between "
              "predictions with no deploy going on")
        print("| model MB | deploy → active s | largest prediction gap at the swap | the same with no deploy "
              "| frames dropped | seq gaps |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for mb, t, g, q, iv, d, s in rows:
            print(f"| {mb:g} | {t:.2f} | {g:.1f} ms ({g / iv:.1f} intervals) | {q:.1f} ms ({q / iv:.1f} intervals) "
                  f"| {d} | {s} |")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        sub.close()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
