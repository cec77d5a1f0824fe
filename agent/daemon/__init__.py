"""The daemon: ``python -m agent.daemon`` or the ``edge-agent`` script (what systemd starts; agent.daemon.main)."""
