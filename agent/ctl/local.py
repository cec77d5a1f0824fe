"""agent-ctl probe and agent-ctl config check: the commands that need no broker."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from agent.config import ConfigError, load_config
from agent.ctl.errors import EXIT_OK, EXIT_USAGE
from agent.hardware.facts import TEGRA_SOCS, HardwareFacts
from agent.runtimes.base import RuntimeChoice, RuntimeChoiceError
from agent.runtimes.choice import choose_runtime, chooser, probe
from agent.runtimes.registry import detect_format, format_names


def cmd_probe(args) -> int:
    facts = probe()
    if args.json:
        choices = {}
        for fmt in format_names():
            try:
                c = choose_runtime(facts, fmt)
                choices[fmt] = {"backend": c.backend, "module": c.module, "accelerator": c.accelerator,
                                "providers": list(c.providers), "reason": c.reason}
            except RuntimeChoiceError as exc:
                choices[fmt] = {"error": str(exc)}
        print(json.dumps({**facts.to_json(), "choice": choices}, indent=2))
    else:
        print(format_report(facts))
    return EXIT_OK


def cmd_config_check(args) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(f"{exc.source}: invalid", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_USAGE
    problems = []
    if not cfg.model.path.is_file():
        problems.append(f"model.path: file not found: {cfg.model.path}")
    else:
        problems += _runtime_problems(cfg)
    if (state := _state_dir_problem(cfg.state_dir)) is not None:
        problems.append(state)
    if cfg.model.labels is not None and not cfg.model.labels.is_file():
        problems.append(f"model.labels: file not found: {cfg.model.labels}")
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        p = getattr(cfg.mqtt, key)
        if p is not None and not Path(p).is_file():
            problems.append(f"mqtt.{key}: file not found: {p}")
    if cfg.http.listen:  # what the daemon's HTTP server would refuse at start (exit 2)
        from agent.web.server import read_token, tls_context

        for check in (lambda: cfg.http.token_file and read_token(cfg.http.token_file), lambda: tls_context(cfg.http)):
            try:
                check()
            except ValueError as exc:
                problems.append(str(exc))
    if problems:
        print(f"{args.file}: invalid", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.file}: ok (device {cfg.device_id}, model {cfg.model.path.name}, broker {cfg.mqtt.url})")
    return EXIT_OK


def format_report(facts: HardwareFacts, choices: Mapping[str, RuntimeChoice | Exception] | None = None) -> str:
    """Multi-line text for ``agent-ctl probe``; computes auto choices for tflite and onnx when not given."""
    if choices is None:
        choices = {}
        for fmt in format_names():
            try:
                choices[fmt] = choose_runtime(facts, fmt)
            except RuntimeChoiceError as exc:
                choices[fmt] = exc
    unknown = "unknown"
    lines = [f"Platform:     {facts.platform} ({facts.arch})", f"Model:        {facts.model}"]
    if facts.soc:
        lines.append(f"SoC:          {TEGRA_SOCS.get(facts.soc, facts.soc)}")
    if facts.l4t_release:
        lines.append(f"L4T:          {facts.l4t_release}")
    lines.append(f"CPUs:         {facts.cpu_count or unknown}")
    lines.append(f"Memory:       {f'{facts.memory_mb} MB' if facts.memory_mb else unknown}")
    temps = ", ".join(f"{name} {c:.1f} °C" for name, c in facts.thermal)
    lines.append(f"Temperatures: {temps or 'none reported'}")
    if facts.throttled is not None:
        flags = ", ".join(facts.throttled.active_flags) or "none"
        lines.append(f"Throttled:    {hex(facts.throttled.raw)} ({flags})")
    tpu = ", ".join(facts.edgetpu_devices) or "no device"
    lines.append(f"Edge TPU:     {tpu}; libedgetpu {'found' if facts.edgetpu_library else 'missing'}")
    lines.append(f"GPU nodes:    {', '.join(facts.gpu_devices) or 'none'}")
    lines.append("Runtimes:" if facts.runtimes else "Runtimes:     not checked")
    for r in facts.runtimes.values():
        state = f"ok {r.version or ''}".rstrip() if r.available else f"unavailable ({r.error})"
        if r.fallback:
            state += f", safe mode only ({r.fallback})"
        providers = f" [{', '.join(r.providers)}]" if r.providers else ""
        lines.append(f"  {r.name:<16} {state}{providers}")
    lines.append("Choice:")
    for fmt, choice in choices.items():
        text = choice.reason if isinstance(choice, RuntimeChoice) else f"error: {choice}"
        lines.append(f"  {fmt:<7} {text}")
    return "\n".join(lines)


def _runtime_problems(cfg) -> list[str]:
    """What the daemon would refuse about the model and runtime.backend/accelerator on this machine."""
    try:
        fmt = detect_format(cfg.model.path)
    except ValueError as exc:
        return [f"model.path: {exc}"]
    try:
        chooser(probe(check_runtimes="first"), cfg.model.path, cfg.runtime.backend, cfg.runtime.accelerator)(fmt)
    except RuntimeChoiceError as exc:
        return [f"runtime: {exc}"]
    return []


def _state_dir_problem(path: Path) -> str | None:
    """Why the daemon could not keep its state in ``path`` (the first existing directory on the way decides)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"state_dir: {existing} is not a directory, so {path} cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created ({existing} is not writable)"
        return f"state_dir: {path} {what} by this user"
    return None


def add_parsers(sub) -> None:
    sp = sub.add_parser("probe", help="what the hardware probe finds and which runtime it would pick")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_probe)

    sp = sub.add_parser("config", help="configuration tools")
    csub = sp.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    cp = csub.add_parser("check", help="validate a config file: exit 0 if usable, 2 with one line per problem")
    cp.add_argument("file", type=Path)
    cp.set_defaults(func=cmd_config_check)
