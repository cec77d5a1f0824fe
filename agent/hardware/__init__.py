"""The machine the agent runs on: facts read once at start-up, sensors read while it runs."""
