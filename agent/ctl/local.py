"""agent-ctl probe and agent-ctl config check: the commands that need no broker."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agent.config import ConfigError, load_config
from agent.ctl.errors import EXIT_OK, EXIT_USAGE


def cmd_probe(args) -> int:
    from agent.hardware import probe

    facts = probe.probe()
    if args.json:
        choices = {}
        for fmt in ("tflite", "onnx"):
            try:
                c = probe.choose_runtime(facts, fmt)
                choices[fmt] = {"backend": c.backend, "module": c.module, "accelerator": c.accelerator,
                                "providers": list(c.providers), "reason": c.reason}
            except probe.RuntimeChoiceError as exc:
                choices[fmt] = {"error": str(exc)}
        print(json.dumps({**facts.to_json(), "choice": choices}, indent=2))
    else:
        print(probe.format_report(facts))
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
    if cfg.model.labels is not None and not cfg.model.labels.is_file():
        problems.append(f"model.labels: file not found: {cfg.model.labels}")
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        p = getattr(cfg.mqtt, key)
        if p is not None and not Path(p).is_file():
            problems.append(f"mqtt.{key}: file not found: {p}")
    if problems:
        print(f"{args.file}: invalid", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.file}: ok (device {cfg.device_id}, model {cfg.model.path.name}, broker {cfg.mqtt.url})")
    return EXIT_OK


def add_parsers(sub) -> None:
    sp = sub.add_parser("probe", help="what the hardware probe finds and which runtime it would pick")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_probe)

    sp = sub.add_parser("config", help="configuration tools")
    csub = sp.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    cp = csub.add_parser("check", help="validate a config file: exit 0 if usable, 2 with one line per problem")
    cp.add_argument("file", type=Path)
    cp.set_defaults(func=cmd_config_check)
