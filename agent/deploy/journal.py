"""Every deployment's outcome on disk, so none is applied twice or retried after it failed."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from agent.vocab import APPLIED_STATES

log = logging.getLogger(__name__)
UNVERIFIED_PREFIX = "payload-"  # rejections of what could not be verified are kept by their bytes' hash
KEEP_UNVERIFIED = 1000  # ... the newest this many: a flood of junk must not grow the journal for ever
COMPACT_AFTER_LINES = 5000  # lines appended since the last compaction that make the next one


class Journal:
    """Append-only JSON lines: {"deployment_id", "state", "ts", "reason"}; the last line per id wins.

    Compacted (one line per id, the oldest unverified rejections dropped) when it opens with many more
    lines than ids, and after every COMPACT_AFTER_LINES appends; a deployment's own id is never dropped.
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._state: dict[str, dict] = {}
        self._appended = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = 0
        if path.exists():
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                lines = n
                try:
                    entry = json.loads(line)
                    self._state[str(entry["deployment_id"])] = entry
                except (ValueError, KeyError, TypeError):
                    # A torn last line after a power cut: skip it, keep the rest.
                    log.warning("journal %s: skipping unreadable line %d", path, n)
        unverified = sum(k.startswith(UNVERIFIED_PREFIX) for k in self._state)
        if lines > 2 * len(self._state) + 100 or unverified > KEEP_UNVERIFIED:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the file with one line per id (atomically), keeping KEEP_UNVERIFIED unverified ones."""
        unverified = sorted((e for k, e in self._state.items() if k.startswith(UNVERIFIED_PREFIX)),
                            key=lambda e: e.get("ts", 0))
        for old in unverified[:-KEEP_UNVERIFIED] if len(unverified) > KEEP_UNVERIFIED else []:
            del self._state[str(old["deployment_id"])]
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for entry in sorted(self._state.values(), key=lambda e: e.get("ts", 0)):
                f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._appended = 0

    def state(self, deployment_id: str) -> str | None:
        entry = self._state.get(deployment_id)
        return entry["state"] if entry else None

    def entry(self, deployment_id: str) -> dict | None:
        return self._state.get(deployment_id)

    def finished(self, deployment_id: str) -> bool:
        return self.state(deployment_id) in APPLIED_STATES

    def record(self, deployment_id: str, state: str, reason: str | None = None, **extra) -> None:
        entry = {"deployment_id": deployment_id, "state": state, "ts": time.time(), "reason": reason, **extra}
        with self._lock:
            self._state[deployment_id] = entry
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                    f.flush()
                    if state in APPLIED_STATES:
                        os.fsync(f.fileno())
            except OSError as exc:  # a full disk: the event still goes out; this run remembers the state
                log.error("journal %s: cannot record %s %s (%s); kept in memory until a restart",
                          self.path, deployment_id, state, exc.strerror or exc)
                return
            self._appended += 1
            if self._appended >= COMPACT_AFTER_LINES:
                self._compact()

    def counts(self) -> dict[str, int]:
        """How many deployments are in each state now (the last state of each id)."""
        out: dict[str, int] = {}
        for entry in list(self._state.values()):
            out[entry["state"]] = out.get(entry["state"], 0) + 1
        return out

    def latest(self, n: int = 20) -> list[dict]:
        return sorted(self._state.values(), key=lambda e: e["ts"])[-n:]
