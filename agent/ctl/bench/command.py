"""agent-ctl bench MODEL: the table, the JSON and the command's arguments."""

from __future__ import annotations

import json
from pathlib import Path

from agent.ctl.args import COUNT, number
from agent.ctl.bench.run import bench
from agent.ctl.errors import EXIT_OK, CtlError, UsageError


def format_table(r: dict) -> str:
    lines = [
        f"{Path(r['model']).name} on {r['backend']}/{r['accelerator']}, {r['threads']} threads",
        f"  throughput        bare {r['default_fps']:8.1f} fps   agent {r['agent_fps']:8.1f} fps   ratio {r['ratio']:.3f}"
        f"   (bare: {r['runtime']}'s defaults, {r['threads']} threads, in a process of numpy and it alone)",
        f"                    bare {r['bare_fps']:8.1f} fps with the agent's own session settings: "
        f"ratio {r['ratio_agent_settings']:.3f}",
        f"  agent overhead    {r['overhead_ms_per_frame']:+.3f} ms per frame (against the defaults' loop)",
        f"  bare latency      p50 {r['default_p50_ms']:.2f} ms (defaults), {r['bare_p50_ms']:.2f} ms "
        f"(agent's settings; p99 {r['bare_p99_ms']:.2f} ms); agent's own inference p50 "
        f"{r['agent_inference_p50_ms']:.2f} ms",
        f"  at 15 fps         capture→subscriber p50 {r['e2e_p50_ms_15fps']:.2f} ms  p99 {r['e2e_p99_ms_15fps']:.2f} ms "
        f"(inference p99 {r['inference_p99_ms_15fps']:.2f} ms)",
        f"  RSS               bare {r['default_rss_mb']:.0f} MB (numpy and {r['runtime']} only)   agent "
        f"{r['agent_rss_mb']:.0f} MB ({r['agent_rss_mb'] - r['default_rss_mb']:+.0f} MB)",
        f"  CPU at 15 fps     {r['cpu_percent_15fps']:.0f} % (of one core)",
    ]
    for label, key in (("full rate", "spin_full_rate"), ("15 fps", "spin_15fps")):
        if spin := r.get(key):
            lines.append(f"  spin-wait, {label:9} {'on' if spin['spinning'] else 'off'} ({spin['policy']}: {spin['reason']})")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    model = Path(args.model).resolve()  # the bare child runs from the repo root, not from here
    if not model.is_file():
        raise UsageError(f"model file not found: {model}")
    source = args.source
    if source != "synthetic":
        kind, path = ("images:", source[7:]) if source.startswith("images:") else ("", source)
        if not Path(path).exists():
            raise UsageError(f"--source: {source} not found (synthetic, or a video file / images:DIR)")
        source = kind + str(Path(path).resolve())  # the agent runs from the repo root, not from here
    try:
        result = bench(model, seconds=args.seconds, threads=args.threads, source=source)
    except RuntimeError as exc:
        raise CtlError(str(exc)) from None
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return EXIT_OK


def add_parsers(sub) -> None:
    sp = sub.add_parser("bench", help="bare interpreter vs the whole agent on one model, side by side")
    sp.add_argument("model")
    sp.add_argument("--seconds", type=number(float, low=1), default=10, help="seconds each for bare and agent at full rate, taken in 1 s turns; also the 15 fps phase, up to 10 (default 10)")
    sp.add_argument("--threads", type=COUNT, default=0, help="inference threads (default: as the agent picks for runtime.threads: 0)")
    sp.add_argument("--source", default="synthetic", help="synthetic (640x480), a video file, or images:DIR")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_bench)
