"""agent-ctl as an MQTT client: the config it reads, a short-lived connection, JSON messages."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentConfig, ConfigError, default_config_path, load_config, parse_config
from agent.ctl.errors import CtlError, UsageError
from agent.deploy.manifest import load_private_key
from agent.messaging.link import make_client


def ctl_config(args) -> AgentConfig:
    """The config agent-ctl reads broker settings and the device id from (``--config``, ``--broker``)."""
    path = Path(args.config) if args.config else default_config_path()
    try:
        cfg = load_config(path) if path.exists() else parse_config({}, "defaults")
    except ConfigError as exc:
        raise UsageError(f"invalid configuration in {exc.source}:\n  " + "\n  ".join(exc.problems)) from None
    if args.broker:
        try:
            cfg.mqtt.url = args.broker
        except ValueError as exc:
            raise UsageError(f"--broker: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return cfg


class MqttSession:
    """A short-lived MQTT client for one command."""

    def __init__(self, cfg: AgentConfig, timeout: float = 5.0):
        self.cfg = cfg
        self.client, self.endpoint = make_client(cfg.mqtt, f"agent-ctl-{uuid.uuid4().hex[:8]}")
        self._connected = threading.Event()
        self._error: str | None = None
        self._topics: list[str] = []
        self.client.on_connect = self._on_connect
        try:
            self.client.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
        except OSError as exc:
            raise CtlError(f"cannot reach the broker at {self.endpoint}: {exc.strerror or exc}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise CtlError(self._error or f"no answer from the broker at {self.endpoint} within {timeout:.0f} s")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._error = f"the broker at {self.endpoint} refused the connection: {reason_code}"
        else:
            for topic in self._topics:  # again after a reconnect: the broker forgot a clean session
                client.subscribe(topic, qos=1)
            self._connected.set()

    def subscribe(self, topic: str, on_message) -> None:
        self.client.message_callback_add(topic, lambda c, u, m: on_message(m))
        self._topics.append(topic)
        self.client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def signing_key(path: Path) -> Ed25519PrivateKey:
    """The operator's private key (from agent-ctl keygen) for --sign-key; UsageError, one line, if not."""
    if not path.is_file():
        raise UsageError(f"signing key not found: {path}")
    try:
        return load_private_key(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--sign-key {path}: {getattr(exc, 'strerror', None) or exc}") from None


def last_status(session: MqttSession, prefix: str, device: str, wait: float = 1.0) -> dict | None:
    """The device's retained status (its last word: online, or offline from its last will), None if it has
    never connected to this broker."""
    got: list[dict] = []
    done = threading.Event()

    def on_status(msg) -> None:
        if (data := json_object(msg)) is not None:
            got.append(data)
            done.set()

    session.subscribe(f"{prefix}/{device}/status", on_status)
    done.wait(wait)
    return got[-1] if got else None


def absent(device: str, status: dict | None) -> str | None:
    """Why ``device`` will not answer now (never seen, or offline), or None when it says it is online."""
    if status is None:
        return f"{device}: never seen on this broker (no retained status); check the device id"
    if status.get("state") != "online":
        ts = status.get("ts")
        since = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if isinstance(ts, int | float) else ""
        return f"{device}: offline{since}"
    return None


def json_object(msg: paho.MQTTMessage) -> dict | None:
    """The message as a JSON object, or None when it is not one."""
    try:
        data = json.loads(msg.payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
