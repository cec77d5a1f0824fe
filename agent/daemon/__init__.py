"""The daemon: ``python -m agent.daemon`` or the ``edge-agent`` script (what systemd starts)."""

from agent.daemon.main import main

__all__ = ["main"]
