#!/usr/bin/env python3
"""Run `agent-ctl bench` on each model N times and print the table for docs/benchmarks.md (medians).

    python scripts/bench/run_table.py [--runs 5] [--seconds 8] [MODEL ...]

Default models: the bundled BlazeFace (.tflite and .onnx) and whatever scripts/bench/make_models.py
has built in bench-models/. Each run is bare and agent side by side on the same model and threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = ["default_fps", "bare_fps", "agent_fps", "ratio", "ratio_agent_settings", "overhead_ms_per_frame",
        "e2e_p99_ms_15fps", "inference_p99_ms_15fps", "default_rss_mb", "agent_rss_mb", "cpu_percent_15fps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    models = [Path(m) for m in args.models] or [ROOT / "models/face/blazeface.tflite",
                                                ROOT / "models/face/blazeface.onnx",
                                                *sorted((ROOT / "bench-models").glob("*.onnx")),
                                                *sorted((ROOT / "bench-models").glob("*.tflite"))]
    rows = []
    for model in models:
        runs = []
        for i in range(args.runs):
            print(f"{model.name}: run {i + 1}/{args.runs}", file=sys.stderr, flush=True)
            r = subprocess.run([sys.executable, "-m", "agent.ctl", "bench", str(model), "--seconds", str(args.seconds),
                                "--threads", str(args.threads), "--json"], cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"bench failed on {model}: {r.stderr.strip()[-500:]}")
            runs.append(json.loads(r.stdout))
        med = {k: statistics.median(run[k] for run in runs) for k in KEYS}
        rows.append((model.name, runs[0]["backend"], runs[0]["threads"], med))
        print(f"{model.name}: median ratio {med['ratio']:.3f}, overhead {med['overhead_ms_per_frame']:.2f} ms/frame; "
              "per run (defaults' bare / agent): " + ", ".join(f"{r['default_fps']:.0f}/{r['agent_fps']:.0f} fps" for r in runs),
              file=sys.stderr, flush=True)
    print(f"\nmedian of {args.runs} runs, {args.seconds:g} s each\n")
    print("| model | runtime | threads | bare fps (defaults) | agent fps | ratio | ratio to the agent's settings "
          "| overhead ms/frame | e2e p99 @15 fps | inference p99 @15 fps | RSS bare / agent MB | CPU @15 fps |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, backend, threads, m in rows:
        print(f"| {name} | {backend} | {threads} | {m['default_fps']:.0f} | {m['agent_fps']:.0f} | {m['ratio']:.3f} | "
              f"{m['ratio_agent_settings']:.3f} | {m['overhead_ms_per_frame']:.2f} | {m['e2e_p99_ms_15fps']:.1f} ms "
              f"| {m['inference_p99_ms_15fps']:.1f} ms | {m['default_rss_mb']:.0f} / {m['agent_rss_mb']:.0f} "
              f"| {m['cpu_percent_15fps']:.0f} % |")


if __name__ == "__main__":
    main()
