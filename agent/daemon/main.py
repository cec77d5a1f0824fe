"""``edge-agent``: parse the command line, read the config, set up the process, run the Agent."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform as pyplatform
import signal
import sys
from pathlib import Path

import cv2

from agent import __version__
from agent.config import ConfigError, default_config_path, load_config
from agent.daemon.agent import Agent
from agent.daemon.systemd import setup_logging
from agent.inference.modelfile import ManifestError
from agent.runtimes import ModelLoadError, RuntimeChoiceError, RuntimeUnavailable

log = logging.getLogger("agent")
SWITCH_INTERVAL_S = 0.0005


def freeze_startup_objects() -> int:
    """Take what start-up made (modules, config, the first model) out of the garbage collector's sight.

    A full collection walks every tracked object with the GIL held: ~53,000 after start-up, 23-42 ms on
    a 2-core VM, and the frame loop waits that long. Frozen, they are skipped; a full collection then
    walks only what was made since (1.4 ms in a running agent after deploys). Nothing frozen is lost:
    models are freed by reference counting when a deploy replaces them (tested), and start-up garbage
    is collected first.
    Returns how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Run the edge-agent daemon in the foreground.")
    parser.add_argument("--config", type=Path, help="config file (default: $EDGE_AGENT_CONFIG, "
                        "else /etc/edge-agent/agent.yaml, else the bundled config/agent.yaml)")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    args = parser.parse_args(argv)
    path = args.config or default_config_path()
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"edge-agent: invalid configuration in {exc.source}:", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    # What the agent writes (model store, outbox, journal, staging) is for its user and group only, as
    # the unit's UMask=0027 makes it; run by hand with a looser umask it would be 0644/0755.
    os.umask(os.umask(0) | 0o027)
    # The frame loop drops the GIL for every runtime/OpenCV call; with the default 5 ms switch interval
    # it can then wait behind the MQTT and capture threads for milliseconds per frame.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # OpenCV's own thread pool did not make a 640x480 frame's resize faster (70 us on 1 or 2 threads),
    # and its workers take cores from inference: capture's OpenCV calls run on the capture thread alone.
    cv2.setNumThreads(1)
    log.info("edge-agent %s on %s (%s), config %s", __version__, pyplatform.node(), pyplatform.machine(), path)
    try:
        agent = Agent(cfg, path)
    except (FileNotFoundError, ManifestError, RuntimeChoiceError, ValueError) as exc:
        # The configuration or a file it names (model, model.yaml, state_dir, a runtime pin this machine
        # cannot honour): bad input, exit 2 like a config error. A restart would not change it.
        log.error("cannot start: %s", exc)
        return 2
    except (ModelLoadError, RuntimeUnavailable) as exc:
        log.error("cannot start: %s", exc)
        return 1
    freeze_startup_objects()
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    return agent.run()
