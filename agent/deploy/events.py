"""What the deployer says and what it is asked: events on ``<device>/events``, and the jobs on its queue."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.vocab import DeployState


@dataclass(frozen=True)
class ModelRef:
    """Which model an event is about."""

    name: str
    version: str
    sha256: str | None = None

    @classmethod
    def of(cls, stored) -> ModelRef:
        """The reference to a model in the store (a StoredModel)."""
        return cls(stored.name, stored.version, stored.sha256)

    def to_json(self) -> dict[str, str]:
        out = {"name": self.name, "version": self.version}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out


@dataclass(frozen=True)
class DeployEvent:
    """One deployment's progress, as published on the events topic (docs/mqtt.md).

    ``deployment_id``, ``state``, ``progress``, ``error`` and ``ts`` are always there; the rest only
    when set: ``need`` (chunk indices a download still waits for, which agent-ctl sends again),
    ``resumed`` (a restart picked it up), ``model``, ``note``.
    """

    deployment_id: str | None
    state: DeployState
    progress: float | None = None
    error: str | None = None
    need: list[int] | None = None
    resumed: bool | None = None
    model: ModelRef | None = None
    note: str | None = None
    # On a rejection of a manifest that could not be verified: which bytes (sha256, 16 hex digits), so
    # the sender of the real manifest with this id can tell a forged copy's rejection from its own.
    manifest_sha256: str | None = None
    ts: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"deployment_id": self.deployment_id, "state": self.state, "progress": self.progress,
                               "error": self.error, "ts": self.ts}
        for key in ("need", "resumed", "note", "manifest_sha256"):
            if (value := getattr(self, key)) is not None:
                out[key] = value
        if self.model is not None:
            out["model"] = self.model.to_json()
        return out


@dataclass(frozen=True)
class ManifestJob:
    """A manifest (or a cleared retained one: empty payload) that arrived on a deploy topic."""

    topic: str
    payload: bytes
    too_large: int = 0  # the payload's size when it was over the manifest limit (then not kept here)


@dataclass(frozen=True)
class CommandJob:
    """A cmd-topic request the deployer answers in order with deployments (rollback, models)."""

    command: str
    reply: Callable[[Any], None]
    args: dict[str, Any] = field(default_factory=dict)  # e.g. rollback's "to": a version


Job = ManifestJob | CommandJob
