"""``GET /metrics``: the agent's own counters in Prometheus' text format, read at scrape time.

A custom collector on a registry of its own: nothing is counted twice, and nothing runs between
scrapes. Names carry the ``edge_agent_`` prefix and base units (seconds, bytes, celsius); counters
end in ``_total``. Labels are bounded: deployment results come from the fixed state vocabulary,
temperature zones from the machine's sensors, model info has one series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from agent.vocab import TERMINAL_STATES
from agent.web.backend import Counters

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"edge_agent_{name}", doc, value=value)


def _gauge(name: str, doc: str, value: float, unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(f"edge_agent_{name}", doc, value=value, unit=unit)


class AgentCollector(Collector):
    def __init__(self, counters: Callable[[], Counters]):
        self._counters = counters

    def collect(self) -> Iterator:
        c = self._counters()
        yield _counter("frames_captured", "Frames read from the camera.", c.frames_captured)
        yield _counter("frames_processed", "Frames run through the model.", c.frames_processed)
        yield _counter("frames_dropped", "Frames replaced by a newer one before the model got to them.", c.frames_dropped)
        yield _counter("inference_errors", "Frames that gave no prediction (runtime, outputs or decoder failed).",
                       c.inference_errors)
        cumulative, buckets = 0, []
        for bound, n in zip(c.inference_buckets_ms, c.inference_counts, strict=False):
            cumulative += n
            buckets.append((_le(bound / 1000), cumulative))
        buckets.append(("+Inf", sum(c.inference_counts)))
        yield HistogramMetricFamily("edge_agent_inference_duration_seconds", "Time in the runtime per frame.",
                                    buckets=buckets, sum_value=c.inference_sum_ms / 1000)
        yield _counter("predictions_sent", "Predictions handed to the broker link (QoS 0) or the durable outbox (QoS 1).",
                       c.predictions_sent)
        yield _counter("predictions_unsent", "QoS 0 predictions the link could not take (no connection, too large).",
                       c.predictions_unsent)
        yield _counter("predictions_dropped", "Predictions dropped because the publisher fell behind.",
                       c.predictions_dropped)
        yield _counter("mqtt_messages_sent", "MQTT messages the broker took.", c.mqtt_sent)
        yield _counter("mqtt_messages_unsent", "QoS 0 messages that could not go out (no connection).", c.mqtt_unsent)
        yield _gauge("mqtt_connected", "1 while connected to the broker.", int(c.mqtt_connected))
        yield _gauge("outbox_depth", "Messages waiting in the durable outbox.", c.outbox_depth)
        yield _counter("outbox_dropped", "Outbox messages dropped (outbox full or lost).", c.outbox_dropped)
        deployments = CounterMetricFamily("edge_agent_deployments", "Deployments by their final state.",
                                          labels=["result"])
        for state in sorted(TERMINAL_STATES):
            deployments.add_metric([state], c.deployments.get(state, 0))
        yield deployments
        info = InfoMetricFamily("edge_agent_model", "The model serving now.")
        info.add_metric([], {k: str(c.model.get(k, "")) for k in ("name", "version", "sha256", "backend")})
        yield info
        if c.temperatures_c:
            temp = GaugeMetricFamily("edge_agent_temperature_celsius", "Temperature by thermal zone.",
                                     labels=["zone"])
            for zone, value in sorted(c.temperatures_c.items())[:32]:
                temp.add_metric([zone], value)
            yield temp
        yield _counter("cpu_seconds", "CPU time of the agent process (user + system).", c.cpu_seconds)
        yield _gauge("resident_memory_bytes", "Resident memory of the agent process.", c.rss_bytes)
        yield _gauge("uptime_seconds", "Seconds since the agent started.", c.uptime_s)
        yield _gauge("camera_up", "1 while the camera delivers frames.", int(c.camera_up))
        yield _gauge("stream_viewers", "MJPEG viewers connected now.", c.viewers)
        yield _gauge("http_connections", "HTTP connections open now.", c.http_connections)
        yield _counter("http_connections_refused", "HTTP connections closed at once: the bound was reached.",
                       c.http_refused)
        yield _counter("http_connections_timed_out", "HTTP connections closed: no request headers in time.",
                       c.http_timed_out)


def _le(seconds: float) -> str:
    return repr(round(seconds, 6))


class Metrics:
    def __init__(self, counters: Callable[[], Counters]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(counters))

    def render(self) -> bytes:
        return generate_latest(self.registry)
