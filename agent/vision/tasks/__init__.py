"""One file per task decoder; each defines TASK (an agent.vision.registry.Task) and the registry finds it."""
