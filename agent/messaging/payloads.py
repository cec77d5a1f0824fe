"""Payloads at the MQTT boundary: compact JSON, and the typed replies to commands."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


def dumps(obj: dict) -> bytes:
    """Compact JSON; NaN is refused (not JSON, and a subscriber's parser would choke on it)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class CommandReply:
    """The answer to one cmd-topic request: ``{"request_id", "ok", "error", …result}`` on cmd/response."""

    ok: bool
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, error: str) -> CommandReply:
        return cls(False, error)

    def to_json(self, request_id: str | int | None) -> dict[str, Any]:
        return {"request_id": request_id, "ok": self.ok, "error": self.error, **self.result}
