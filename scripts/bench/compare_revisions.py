#!/usr/bin/env python3
"""Two versions of the agent and the bare loop side by side, taking 1 s turns in one run.

    python scripts/bench/compare_revisions.py MODEL [--against HEAD~1] [--seconds 20] [--runs 3]

`agent-ctl bench` compares one agent with the bare loop; on a shared VM whose speed drifts, two
such runs a minute apart do not compare two versions of the agent. Here the bare loop, the agent
at git revision --against (checked out into a temporary worktree) and the agent of this working
tree all start and warm up, then run in turns (each paused with SIGSTOP while another runs), so
drift hits all three alike. Each run prints both ratios; two agents of the same code differ by up
to ~0.015 here, so look at several runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import agent.ctl.bench.run as bench  # noqa: E402


def one_run(model: Path, trees: dict[str, Path], seconds: int, threads: int, work: Path) -> dict[str, float]:
    procs: dict = {}
    brokers = []
    try:
        procs["bare"] = bench.BareChild(model, threads)
        procs["bare"].pause()
        for name, tree in trees.items():
            d = work / name
            d.mkdir()
            brokers.append(bench.LocalBroker(d).start())
            # `python -m agent.daemon` run in that tree: that revision's agent
            procs[name] = bench.AgentRun(model, threads, "synthetic", 0, d, brokers[-1], root=tree)
            procs[name].wait_started()
            procs[name].pause()
        windows = bench.take_turns(procs, seconds, bench.SLICE_S)
        fps = {"bare": bench.rate_in(procs["bare"].finish()["ends"], windows["bare"])}
        for name in trees:
            procs[name].resume()
            time.sleep(0.3)
            fps[name] = bench.rate_in([p["ts"] for _, p in procs[name].messages()[0]], windows[name])
        return fps
    finally:
        if "bare" in procs:
            procs["bare"].kill()
        for name in trees:
            if name in procs:
                procs[name].stop()
        for b in brokers:
            b.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--against", default="HEAD", help="git revision to compare the working tree with (default HEAD)")
    ap.add_argument("--seconds", type=int, default=20, help="seconds each for bare and both agents, in 1 s turns")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    model = args.model.resolve()
    if not model.is_file():
        sys.exit(f"compare_revisions: model file not found: {model}")
    from agent.runtimes import inference_threads

    threads = inference_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="compare-revisions-"))
    old = work / "tree"
    made = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.against],
                          capture_output=True, text=True)
    if made.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        sys.exit(f"compare_revisions: cannot check out {args.against!r}: {made.stderr.strip()}")
    ratios: dict[str, list[float]] = {args.against: [], "working tree": []}
    try:
        for i in range(args.runs):
            run_dir = work / f"run{i}"
            run_dir.mkdir()
            fps = one_run(model, {args.against: old, "working tree": ROOT}, args.seconds, threads, run_dir)
            for name in ratios:
                ratios[name].append(fps[name] / fps["bare"])
            print(f"run {i + 1}/{args.runs}: bare {fps['bare']:.1f} fps; "
                  + "; ".join(f"{n} {fps[n]:.1f} fps (ratio {ratios[n][-1]:.3f})" for n in ratios), flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    for name, r in ratios.items():
        if r:
            print(f"{name}: median ratio {statistics.median(r):.3f} over {len(r)} runs ({min(r):.3f}-{max(r):.3f})")


if __name__ == "__main__":
    main()
