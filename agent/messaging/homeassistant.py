"""Home Assistant MQTT discovery: one device-based config (``<prefix>/device/<id>/config``) for the agent.

The entities read the topics the agent already publishes (status for availability, health for the
sensors) and three small retained topics made for Home Assistant under ``<device>/ha/``: the latest
detection summary (at most once a second, at once when it flips), the model's update state, and the
latest frame as a JPEG (once per health interval). Discovery is sent again whenever Home Assistant
says ``online`` on ``<prefix>/status`` (its birth message after a restart).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent import __version__
from agent.messaging.topics import Topics
from agent.vocab import TERMINAL_STATES

SUMMARY_EVERY_S = 1.0  # detection summaries at most this often, unless "detected" flips
IN_PROGRESS = ("received", "downloading", "verifying", "validating", "activating", "shadowing")
ORIGIN_URL = "https://github.com/edge-agent/edge-agent"


def object_id(device_id: str) -> str:
    """The discovery topic's id: the device id, as Home Assistant takes it there (``[a-zA-Z0-9_-]``)."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", device_id)


def unique_base(device_id: str) -> str:
    """What every unique_id and the device identifier start with: unique beyond this agent's entities."""
    return "edge_agent_" + object_id(device_id)


@dataclass(frozen=True)
class HaTopics:
    discovery: str
    birth: str
    summary: str
    update: str
    image: str

    @classmethod
    def of(cls, topics: Topics, ha_prefix: str) -> HaTopics:
        node = object_id(topics.device)
        base = f"{topics.prefix}/{topics.device}/ha"
        return cls(f"{ha_prefix}/device/{node}/config", f"{ha_prefix}/status", f"{base}/detection",
                   f"{base}/update", f"{base}/image")


def discovery_payload(topics: Topics, ha: HaTopics, *, platform_model: str, has_temperature: bool) -> dict:
    """The device-based discovery config: device, origin, availability and every component."""
    node = unique_base(topics.device)

    def uid(key: str) -> str:
        return f"{node}_{key}"

    health = topics.health
    cmps: dict[str, dict] = {
        "fps": {"p": "sensor", "name": "Frames per second", "state_topic": health, "unit_of_measurement": "fps",
                "state_class": "measurement", "value_template": "{{ value_json.fps }}", "icon": "mdi:speedometer"},
        "inference_ms": {"p": "sensor", "name": "Inference latency", "state_topic": health,
                         "unit_of_measurement": "ms", "device_class": "duration", "state_class": "measurement",
                         "value_template": "{{ value_json.latency_ms.inference.p50 }}", "suggested_display_precision": 1},
        "cpu": {"p": "sensor", "name": "CPU", "state_topic": health, "unit_of_measurement": "%",
                "state_class": "measurement", "entity_category": "diagnostic",
                "value_template": "{{ value_json.cpu_percent }}", "icon": "mdi:cpu-64-bit"},
        "detections": {"p": "sensor", "name": "Detections", "state_topic": ha.summary, "state_class": "measurement",
                       "value_template": "{{ value_json.count }}", "icon": "mdi:account-box"},
        "detected": {"p": "binary_sensor", "name": "Detected", "state_topic": ha.summary, "device_class": "occupancy",
                     "value_template": "{{ 'ON' if value_json.detected else 'OFF' }}",
                     "json_attributes_topic": ha.summary,
                     "json_attributes_template": "{{ {'label': value_json.label, 'score': value_json.score} | tojson }}"},
        "rollback": {"p": "button", "name": "Roll back model", "command_topic": topics.cmd,
                     "payload_press": json.dumps({"command": "rollback", "request_id": "homeassistant"}),
                     "entity_category": "config", "icon": "mdi:undo"},
        "reload": {"p": "button", "name": "Reload configuration", "command_topic": topics.cmd,
                   "payload_press": json.dumps({"command": "reload", "request_id": "homeassistant"}),
                   "entity_category": "config", "icon": "mdi:reload"},
        "model": {"p": "update", "name": "Model", "state_topic": ha.update, "entity_category": "diagnostic",
                  "icon": "mdi:brain"},
        "frame": {"p": "image", "name": "Latest frame", "image_topic": ha.image, "content_type": "image/jpeg"},
    }
    if has_temperature:
        cmps["temperature"] = {
            "p": "sensor", "name": "Temperature", "state_topic": health, "unit_of_measurement": "°C",
            "device_class": "temperature", "state_class": "measurement", "entity_category": "diagnostic",
            "value_template": "{{ value_json.temperature_c.values() | max }}"}
    for key, cmp in cmps.items():
        cmp["unique_id"] = uid(key)
    return {
        "device": {"identifiers": [node], "name": topics.device, "model": platform_model or "Linux",
                   "manufacturer": "edge-agent", "sw_version": __version__},
        "origin": {"name": "edge-agent", "sw_version": __version__, "support_url": ORIGIN_URL},
        "availability": [{"topic": topics.status, "value_template": "{{ value_json.state }}"}],
        "availability_mode": "all",
        "qos": 1,
        "components": cmps,
    }


def detection_summary(results: list) -> dict:
    """What the binary sensor and the detections count read: whether anything was found, the top one."""
    scored = [r for r in results if hasattr(r, "score")]  # raw outputs detect nothing
    top = max(scored, key=lambda r: r.score, default=None)
    return {"detected": bool(scored), "count": len(scored),
            "label": top.label if top is not None else None,
            "score": round(float(top.score), 3) if top is not None else None}


class HomeAssistant:
    """Publishes discovery and the ``ha/`` topics through ``publish(topic, payload, retain)``."""

    def __init__(self, topics: Topics, ha_prefix: str, publish: Callable[[str, bytes, bool], None], *,
                 platform_model: str, has_temperature: bool, installed: Callable[[], str]):
        self.topics = HaTopics.of(topics, ha_prefix)
        self._publish = publish
        self._config = json.dumps(discovery_payload(topics, self.topics, platform_model=platform_model,
                                                    has_temperature=has_temperature)).encode()
        self._installed = installed
        self._last_summary: tuple[float, bool] = (0.0, False)
        self._deploying: tuple[str | None, str | None] = (None, None)  # (version, state) of the deployment under way

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        return [(self.topics.birth, 1)]

    def announce(self) -> None:
        """Discovery and the update state (on connect, and when Home Assistant comes online)."""
        self._publish(self.topics.discovery, self._config, True)
        self.publish_update()

    def on_message(self, topic: str, payload: bytes) -> bool:
        if topic != self.topics.birth:
            return False
        if payload.strip() == b"online":
            self.announce()
        return True

    def on_prediction(self, results: list, now: float | None = None) -> None:
        """Called for every prediction; publishes a summary when it is due or "detected" flipped."""
        now = time.monotonic() if now is None else now
        last, was = self._last_summary
        detected = any(hasattr(r, "score") for r in results)
        if now - last < SUMMARY_EVERY_S and detected == was:
            return
        self._last_summary = (now, detected)
        self._publish(self.topics.summary, json.dumps(detection_summary(results)).encode(), True)

    def on_event(self, event: dict) -> None:
        """Follows the deployment events to say what the update entity shows."""
        state = event.get("state")
        model = event.get("model") if isinstance(event.get("model"), dict) else {}
        version, _ = self._deploying
        if state == "received":
            version = model.get("version")
        if state in TERMINAL_STATES:
            self._deploying = (None, None)
        elif state in IN_PROGRESS or state == "active":
            self._deploying = (version, state)
        self.publish_update()

    def update_state(self) -> dict:
        installed = self._installed()
        version, state = self._deploying
        return {"installed_version": installed, "latest_version": version or installed,
                "in_progress": state is not None, "title": "edge-agent model",
                "release_summary": f"deployment {state}" if state else None}

    def publish_update(self) -> None:
        self._publish(self.topics.update, json.dumps(self.update_state()).encode(), True)

    def publish_image(self, jpeg: bytes) -> None:
        self._publish(self.topics.image, jpeg, True)
