"""agent-ctl, the command-line client: ``python -m agent.ctl`` or the ``agent-ctl`` script (agent.ctl.main).

Nothing is imported here, so ``python -m agent.ctl.bench.bare`` (the bench's bare loop) loads only what it uses.
"""
