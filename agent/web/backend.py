"""What the HTTP server asks of the agent: a narrow interface, so the web room imports nothing of the daemon.

The daemon implements it (``agent/daemon/webhooks.py``); every call comes from the server's own
thread or its executor, never from the frame loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent.camera import Frame
from agent.inference.pipeline import Prediction
from agent.messaging.payloads import CommandReply
from agent.runtimes.base import TensorSpec


@dataclass(frozen=True)
class Counters:
    """The agent's own counters at one moment, as /metrics reads them (no second bookkeeping)."""

    frames_captured: int
    frames_processed: int
    frames_dropped: int
    inference_errors: int
    inference_buckets_ms: tuple[float, ...]
    inference_counts: list[int]  # per bucket, not cumulated; the last one is above every bound
    inference_sum_ms: float
    predictions_sent: int
    predictions_unsent: int
    predictions_dropped: int
    mqtt_sent: int
    mqtt_unsent: int
    mqtt_connected: bool
    outbox_depth: int
    outbox_dropped: int
    deployments: dict[str, int]  # by final state
    model: dict[str, str]  # name, version, sha256, backend
    temperatures_c: dict[str, float]
    cpu_seconds: float
    rss_bytes: int
    uptime_s: float
    camera_up: bool
    viewers: int = 0  # the rest is the HTTP server's own, filled in by it
    http_connections: int = 0
    http_refused: int = 0
    http_timed_out: int = 0


class WebBackend(Protocol):
    device_id: str

    def status(self) -> dict: ...

    def health(self) -> dict | None: ...

    def health_history(self) -> list[dict]: ...

    def command(self, name: str, args: dict, timeout: float) -> CommandReply: ...

    def latest(self) -> tuple[Frame | None, Prediction | None]: ...

    def predict(self, image: np.ndarray, timeout: float) -> dict: ...

    def model_io(self) -> tuple[dict, tuple[TensorSpec, ...], tuple[TensorSpec, ...]]: ...

    def infer_raw(self, tensors: list[np.ndarray], timeout: float) -> list[np.ndarray]: ...

    def counters(self) -> Counters: ...

    def alive(self) -> bool: ...
