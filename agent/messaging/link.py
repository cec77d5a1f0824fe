"""The broker link: connect (TLS, credentials), LWT, subscribe on connect, publish, reconnect, stop."""

from __future__ import annotations

import logging
import os
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttConfig
from agent.support.threads import name_this_thread

log = logging.getLogger(__name__)
PASSWORD_ENV = "EDGE_AGENT_MQTT_PASSWORD"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """mqtt://host[:1883] or mqtts://host[:8883]; credentials in the URL are refused (use password_file)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
    if parts.password:
        raise ValueError("put the broker password in mqtt.password_file or $EDGE_AGENT_MQTT_PASSWORD, not in the URL")
    tls = parts.scheme == "mqtts"
    return Endpoint(parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883), tls)


def read_password(cfg: MqttConfig) -> str | None:
    if cfg.password_file is not None:
        try:
            return cfg.password_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"mqtt.password_file: cannot read {cfg.password_file} ({exc.strerror})") from None
    return os.environ.get(PASSWORD_ENV)


def make_client(cfg: MqttConfig, client_id: str) -> tuple[paho.Client, Endpoint]:
    """A configured paho client (VERSION2 callbacks), not yet connected."""
    endpoint = parse_url(cfg.url)
    protocol = paho.MQTTv5 if cfg.protocol == "5" else paho.MQTTv311
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    if endpoint.tls:
        try:
            ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        except OSError as exc:  # missing, unreadable or not PEM (ssl.SSLError is an OSError)
            raise ValueError(f"mqtt.ca_file: cannot load {cfg.ca_file} ({exc.strerror or exc})") from None
        if cfg.cert_file and cfg.key_file:
            try:
                ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
            except OSError as exc:
                raise ValueError(f"mqtt.cert_file/key_file: cannot load {cfg.cert_file} with {cfg.key_file} "
                                 f"({exc.strerror or exc})") from None
        client.tls_set_context(ctx)
    password = read_password(cfg)
    if cfg.username or password:
        client.username_pw_set(cfg.username or "", password)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client, endpoint


PUBLISH_OVERHEAD = 16  # fixed header, topic length, packet id and properties of a PUBLISH, at most
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: a client with the same id connected
# Brokers that just close the socket (mosquitto 2.0.11 does) give no reason: a connection that is dropped
# this soon after it was made, this many times in a minute, is taken as taken over all the same.
DROPPED_SOON_S = 5.0
DROPPED_SOON_TIMES = 3


class MqttLink:
    """One paho client with a clear lifecycle. Callbacks run on paho's network thread."""

    def __init__(self, cfg: MqttConfig, client_id: str, *, will: tuple[str, bytes] | None = None,
                 subscriptions: tuple[tuple[str, int], ...] = (),
                 on_connect: Callable[[], None] | None = None,
                 on_message: Callable[[paho.MQTTMessage], None] | None = None):
        self.cfg = cfg
        self.client, self.endpoint = make_client(cfg, client_id)
        self.client_id = client_id
        self.subscriptions = subscriptions
        self._on_connect = on_connect
        self._on_message = on_message
        self._connected = threading.Event()
        self.state = "connecting"  # connecting | connected | disconnected
        self.last_error: str | None = None
        self.sent = 0
        self.unsent = 0  # QoS 0 messages that could not go out (no connection)
        self.connects = 0
        self.taken_over = 0  # times the broker took the session away (see _handle_disconnect)
        self.refused = 0  # QoS 1 messages the broker acknowledged with a failure (MQTT 5 PUBACK >= 0x80)
        self.oversize = 0  # messages not sent: larger than the broker's (or mqtt.max_packet_kb's) limit
        self._configured_max = cfg.max_packet_kb * 1024 if cfg.max_packet_kb else None
        self.max_packet = self._configured_max
        self._connected_at = 0.0
        self._dropped_soon: list[float] = []
        self._socket_error: str | None = None  # a read error paho only reports through on_log
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self.client.on_connect_fail = self._handle_connect_fail
        self.client.on_log = self._handle_log
        self.client.on_publish = self._handle_publish
        self.publish_listener: Callable[[int], None] | None = None  # the outbox hears PUBACKs here

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Connect in the background; keeps retrying with backoff while the broker is away."""
        self.client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def fits(self, topic: str, payload: bytes | str) -> bool:
        """Whether a PUBLISH of this fits the broker's maximum packet size (its CONNACK said, or the config)."""
        if self.max_packet is None:
            return True
        size = len(topic.encode()) + len(payload.encode() if isinstance(payload, str) else payload)
        return size + PUBLISH_OVERHEAD <= self.max_packet

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool:
        """Queue a message; False when it could not be handed to the broker link (or cannot fit it)."""
        if not self.fits(topic, payload):
            self.too_large(topic, payload)
            return False
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == paho.MQTT_ERR_SUCCESS:
            self.sent += 1
            return True
        self.unsent += 1
        return False

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 2.0) -> None:
        """Publish ``final`` (e.g. the offline status) if connected, then disconnect cleanly."""
        self._stopping = True
        if final is not None and self.connected:
            info = self.client.publish(final[0], final[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            error = f"broker refused the connection: {reason_code}"
            if error != self.last_error:  # once, not on every retry
                log.error("mqtt: %s (%s)", error, self.endpoint)
            self.last_error = error
            self.state = "disconnected"
            return
        self.connects += 1
        self._connected_at = time.monotonic()
        advertised = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        if advertised:
            self.max_packet = min(advertised, self._configured_max or advertised)
        self.state = "connected"
        self.last_error = None
        log.info("mqtt: connected to %s", self.endpoint)
        name_this_thread("ea-mqtt")  # paho's network thread runs this callback
        for topic, qos in self.subscriptions:
            if self.cfg.protocol == "5":
                # Retain-as-published: a retained command keeps its flag even for a live subscriber,
                # so it is recognised (and ignored) at once, not only after a reconnect.
                client.subscribe(topic, options=SubscribeOptions(qos=qos, retainAsPublished=True))
            else:
                client.subscribe(topic, qos)
        self._connected.set()
        if self._on_connect:
            try:
                self._on_connect()
            except Exception:  # noqa: BLE001
                log.exception("on_connect handler failed")

    def too_large(self, topic: str, payload: bytes | str) -> None:
        """Count and log a message that was not sent because the broker would drop the link for it."""
        self.oversize += 1
        if self.oversize == 1 or self.oversize % 100 == 0:
            log.warning("mqtt: not sent: %d bytes on %s is over the broker's maximum packet size of %d bytes "
                        "(%d such messages)", len(payload), topic, self.max_packet, self.oversize)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if getattr(reason_code, "is_failure", False):
            # The broker has the message and says no (e.g. 0x87 Not authorized by its ACL): sending it
            # again would get the same answer, so it leaves the outbox like a delivered one, counted.
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:
                log.warning("mqtt: the broker refused a message: %s (%d refused so far)", reason_code,
                            self.refused)
        if self.publish_listener is not None:
            self.publish_listener(mid)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self.state = "disconnected"
        if getattr(self, "_stopping", False):
            return
        if was and self._taken_over(reason_code):
            # Usually a second device with this device_id (a cloned SD card keeps the hostname): each
            # reconnect throws the other one off, every second, on both.
            self.taken_over += 1
            self.last_error = (f"the broker keeps ending this session ({self.taken_over} times): another client "
                               f"connects as {self.client_id!r}, two devices with one device_id? Give each its "
                               "own (device_id in agent.yaml)")
            if self.taken_over == 1 or self.taken_over % 20 == 0:
                log.warning("mqtt: %s", self.last_error)
        elif was:
            log.warning("mqtt: disconnected from %s (%s); reconnecting", self.endpoint, reason_code)
        elif self._socket_error:  # dropped before CONNACK, e.g. the broker rejected our TLS client certificate
            hint = ""
            if self.endpoint.tls and self.cfg.cert_file is None:  # the alert can arrive as a bare EOF
                hint = " (if the broker requires client certificates, set mqtt.cert_file and mqtt.key_file)"
            self._connect_failed(self._socket_error + hint)
        self._socket_error = None

    def _taken_over(self, reason_code) -> bool:
        """Whether this disconnect took the session away: the broker said so, or it keeps dropping us
        seconds after each connect."""
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER:
            return True
        now = time.monotonic()
        if now - self._connected_at < DROPPED_SOON_S:
            self._dropped_soon = [t for t in self._dropped_soon if now - t < 60.0] + [now]
        return len(self._dropped_soon) >= DROPPED_SOON_TIMES and self._dropped_soon[-1] == now

    def _handle_connect_fail(self, client, userdata) -> None:
        # paho calls this from inside its `except OSError` around reconnect(): that exception is the reason
        # (connection refused, DNS, "certificate verify failed", ...).
        exc = sys.exc_info()[1]
        self._connect_failed(str(exc) if exc else "unreachable")

    def _handle_log(self, client, userdata, level, buf) -> None:
        if level == paho.MQTT_LOG_ERR and buf.startswith("failed to receive on socket: "):
            self._socket_error = buf.removeprefix("failed to receive on socket: ")

    def _connect_failed(self, reason: str) -> None:
        """Log why the connection failed, once per distinct reason (not on every retry)."""
        self.state = "disconnected"
        if reason != self.last_error:
            log.warning("mqtt: cannot connect to %s: %s; retrying in the background", self.endpoint, reason)
        self.last_error = reason

    def _handle_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(msg)
        except Exception:  # noqa: BLE001 - a bad message must never kill the network thread
            log.exception("mqtt: handler for %s failed", msg.topic)
