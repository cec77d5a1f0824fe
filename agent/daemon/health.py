"""Health metrics: rates, latency percentiles, process and machine facts, as one plain record."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from agent.hardware import sensors
from agent.support.stats import percentiles


@dataclass(frozen=True)
class CameraHealth:
    state: str
    source: str
    reopens: int
    error: str | None


@dataclass(frozen=True)
class MqttHealth:
    state: str
    sent: int
    unsent: int
    error: str | None
    taken_over: int = 0  # dropped by the broker for another client with our id (a duplicate device_id)
    refused: int = 0  # QoS 1 messages the broker acknowledged with a failure (not retried)
    oversize: int = 0  # messages not sent: over the broker's maximum packet size


@dataclass(frozen=True)
class OutboxHealth:
    depth: int
    dropped: int
    error: str | None
    predictions_dropped: int
    memory_only: int = 0  # QoS 1 messages the outbox could not store (disk full): lost if the agent stops first


@dataclass
class Health:
    ts: float
    uptime_s: float
    fps: float
    capture_fps: float
    latency_ms: dict  # inference p50/p95/p99, total p50/p95/p99
    frames_captured: int
    frames_processed: int
    frames_dropped: int
    inference_errors: int
    camera: CameraHealth
    mqtt: MqttHealth
    cpu_percent: float
    rss_mb: float
    temperature_c: dict[str, float]
    throttled: dict | None
    gpu: dict | None
    disk_free_mb: float | None
    outbox_depth: int
    model: dict
    outbox: OutboxHealth | None = None
    notify_missed: int = 0  # sd_notify messages systemd did not take (its reader behind)

    def to_json(self) -> dict:
        return asdict(self)


class HealthSampler:
    """Computes a Health record from the parts' counters; rates are over the time since the last sample."""

    def __init__(self, *, root: str = "/", state_dir: Path | None = None):
        self.root = root
        self.state_dir = state_dir
        self.started = time.monotonic()
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # first call primes the counter
        # Found once: searching sysfs every sample held the GIL beside the frame loop for milliseconds.
        self.zones = sensors.thermal_zones(root)
        self._throttled = sensors.throttled_path(root)
        self._last = (time.monotonic(), 0, 0)

    def sample(self, *, pipeline, capture, slot, mqtt, model_info, outbox_depth: int = 0) -> Health:
        now = time.monotonic()
        t0, processed0, captured0 = self._last
        dt = max(now - t0, 1e-6)
        stats = pipeline.stats
        self._last = (now, stats.processed, capture.captured)
        disk = None
        if self.state_dir is not None:
            try:
                disk = round(shutil.disk_usage(self.state_dir).free / 2**20, 1)
            except OSError:
                disk = None
        throttled = sensors.read_throttled(path=self._throttled) if self._throttled is not None else None
        return Health(
            ts=time.time(),
            uptime_s=round(now - self.started, 1),
            fps=round((stats.processed - processed0) / dt, 2),
            capture_fps=round((capture.captured - captured0) / dt, 2),
            latency_ms={"inference": percentiles(list(stats.inference_ms)), "total": percentiles(list(stats.total_ms))},
            frames_captured=capture.captured,
            frames_processed=stats.processed,
            frames_dropped=slot.dropped,
            inference_errors=stats.errors,
            camera=CameraHealth(capture.state, capture.source.name, capture.reopens, capture.last_error),
            mqtt=MqttHealth(mqtt.state, mqtt.sent, mqtt.unsent, mqtt.last_error, mqtt.taken_over, mqtt.refused,
                            mqtt.oversize),
            cpu_percent=round(self._proc.cpu_percent(None), 1),
            rss_mb=round(self._proc.memory_info().rss / 2**20, 1),
            temperature_c=sensors.read_temperatures(zones=self.zones),
            throttled=throttled.to_json() if throttled else None,
            gpu=sensors.jetson_gpu_load(self.root),
            disk_free_mb=disk,
            outbox_depth=outbox_depth,
            model=model_info.brief(),
        )
