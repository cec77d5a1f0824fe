"""agent-ctl, the command-line client: ``python -m agent.ctl`` or the ``agent-ctl`` script."""

from agent.ctl.main import main

__all__ = ["main"]
