"""Every deployment's outcome on disk, so none is applied twice or retried after it failed."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from agent.vocab import TERMINAL_STATES

log = logging.getLogger(__name__)



class Journal:
    """Append-only JSON lines: {"deployment_id", "state", "ts", "reason"}; the last line per id wins."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._state: dict[str, dict] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self._state[str(entry["deployment_id"])] = entry
                except (ValueError, KeyError, TypeError):
                    # A torn last line after a power cut: skip it, keep the rest.
                    log.warning("journal %s: skipping unreadable line %d", path, n)

    def state(self, deployment_id: str) -> str | None:
        entry = self._state.get(deployment_id)
        return entry["state"] if entry else None

    def entry(self, deployment_id: str) -> dict | None:
        return self._state.get(deployment_id)

    def finished(self, deployment_id: str) -> bool:
        return self.state(deployment_id) in TERMINAL_STATES

    def record(self, deployment_id: str, state: str, reason: str | None = None, **extra) -> None:
        entry = {"deployment_id": deployment_id, "state": state, "ts": time.time(), "reason": reason, **extra}
        with self._lock:
            self._state[deployment_id] = entry
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                if state in TERMINAL_STATES:
                    os.fsync(f.fileno())

    def latest(self, n: int = 20) -> list[dict]:
        return sorted(self._state.values(), key=lambda e: e["ts"])[-n:]
