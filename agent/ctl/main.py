"""agent-ctl: a client of the MQTT API (and of the local probe and config checker), never a back door.

Each command group is one file that adds its own sub-commands: local (probe, config check), fleet
(status, watch), deploy (deploy, rollback, models, snapshot, keygen) and bench.
"""

from __future__ import annotations

import argparse
import os
import sys

from agent import __version__
from agent.ctl import deploy, device, fleet, local
from agent.ctl.bench import command as bench
from agent.ctl.errors import EXIT_FAILED, EXIT_USAGE, CtlError, UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-ctl", description="Control and watch edge-agent devices over MQTT.")
    p.add_argument("--config", help="config file for broker settings and the device id "
                   "(default: $EDGE_AGENT_CONFIG, else /etc/edge-agent/agent.yaml, else the bundled one)")
    p.add_argument("--broker", help="broker URL, overriding the config: mqtt[s]://host:port")
    p.add_argument("--version", action="version", version=f"agent-ctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (local, fleet, deploy, device, bench):
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"agent-ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as exc:
        print(f"agent-ctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (agent-ctl probe --json | head): stop quietly. Python's own advice: point
        # stdout at /dev/null so the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
