"""Store-and-forward for QoS ≥ 1 streams: on disk first, removed only when the broker acknowledges.

paho keeps QoS 1 messages in memory only (lost on restart). Here every such message is written to
the sqlite outbox, published while the link is up with a bounded window, and deleted on PUBACK.
After a reconnect paho resends what was in flight (same mid); after a restart everything still in
the outbox is sent again, so a crash can duplicate (boot_id + seq tell them apart), never lose.

What waits goes out in this order, all within the one rate: control messages (deployment events,
health), then live predictions (made in the last LIVE_S; the newest that fit the window, in order),
then the backlog, oldest first. So an operator's deployment and today's predictions never wait
behind an outage's thousands.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import suppress

import paho.mqtt.client as paho

from agent.messaging.link import MqttLink
from agent.messaging.outbox import CONTROL, DATA, Outbox, OutboxError
from agent.support.threads import name_this_thread

log = logging.getLogger(__name__)
HEARD_KEEP_S = 1.0  # an early PUBACK is booked within milliseconds of its publish
LIVE_S = 2.0  # a prediction this young is live traffic: it goes out before the backlog


class DurableSender:
    """Drains the outbox into the broker link on its own thread, at most ``rate`` messages/s."""

    def __init__(self, link: MqttLink, outbox: Outbox | None, *, rate: float = 200.0, window: int = 64):
        self.link, self.outbox = link, outbox
        self.rate, self.window = rate, window
        self.errors = 0
        self.last_error: str | None = None
        self.memory_only = 0  # messages the outbox could not store (disk full): in paho's memory only
        self.lost = 0  # of those, ones paho would not take either (its queue full): gone, and counted
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id
        # on_publish for mids not in flight: a PUBACK that beat the bookkeeping below, or (far more
        # often) a QoS 0 message written, which paho reports too, numbered from the same counter.
        self._heard: dict[int, float] = {}  # mid -> when it was heard (monotonic)
        self._heard_order: deque[tuple[int, float]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        link.publish_listener = self._on_puback

    @property
    def depth(self) -> int:
        return self.outbox.depth() if self.outbox else 0

    @property
    def dropped(self) -> int:
        """Every QoS 1 message given up on: the outbox's oldest (over its bound, or its disk nearly
        full) and ones neither the disk nor paho's memory could take."""
        return (self.outbox.dropped if self.outbox else 0) + self.lost

    def start(self) -> None:
        if self.outbox is not None:
            self._thread.start()

    def stop(self, flush_s: float = 1.0) -> None:
        """Give in-flight messages a moment to be acknowledged, then stop (the rest stays on disk)."""
        deadline = time.monotonic() + flush_s
        while self.outbox is not None and self.link.connected and self.depth and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(2)

    def submit(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, control: bool = False) -> None:
        """Keep ``payload`` until the broker has it; on a full or broken disk, fall back to memory.

        ``control`` messages (deployment events, health) go out before any prediction waiting."""
        if self.outbox is not None:
            try:
                self.outbox.put(topic, payload, qos=qos, retain=retain, lane=CONTROL if control else DATA)
                self._wake.set()
                if self.last_error is not None:
                    log.warning("outbox: storing messages again (after %d that were not)", self.errors)
                    self.last_error = None
                return
            except OutboxError as exc:
                self.errors += 1
                self.memory_only += 1
                if self.errors == 1 or self.errors % 100 == 0 or str(exc) != self.last_error:
                    log.error("%s; sending from memory only (%d such errors)", exc, self.errors)
                self.last_error = str(exc)
            if not self.link.fits(topic, payload):
                self.link.too_large(topic, payload)  # counted there
                return
            # While the broker is away paho keeps a QoS 1 message queued; refused only when its queue is full.
            if self.link.client.publish(topic, payload, qos=qos, retain=retain).rc == paho.MQTT_ERR_QUEUE_SIZE:
                self.lost += 1
            return
        self.link.publish(topic, payload, qos=qos, retain=retain)

    def _on_puback(self, mid: int) -> None:
        with self._lock:
            oid = self._inflight.pop(mid, None)
            if oid is None:
                now = time.monotonic()
                self._heard[mid] = now
                self._heard_order.append((mid, now))
                # What was heard more than a second ago can no longer be an early PUBACK: forget it,
                # so QoS 0 traffic keeps this small.
                while self._heard_order and self._heard_order[0][1] < now - HEARD_KEEP_S:
                    old, t = self._heard_order.popleft()
                    if self._heard.get(old) == t:
                        del self._heard[old]
                return
            # Booked before the lock is let go: _next must see it in flight or booked, never neither.
            self._ack(oid)

    def _ack(self, oid: int) -> None:
        # Booked at once (never offered again), deleted by the sender's next turn, many in one
        # transaction: one commit per PUBACK capped draining at about 300 messages/s here.
        self.outbox.acked(oid)  # type: ignore[union-attr]
        self._wake.set()

    def _run(self) -> None:
        assert self.outbox is not None
        name_this_thread("ea-outbox")
        tokens, last = float(self.window), time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            try:
                self.outbox.delete_acked()  # PUBACKs heard since the last turn, and deletes a full disk refused
            except OutboxError as exc:
                self.last_error = str(exc)
            if not self.link.connected:
                continue
            with self._lock:
                room = self.window - len(self._inflight)
            if room <= 0:
                continue
            now = time.monotonic()
            tokens = min(float(self.window), tokens + (now - last) * self.rate)
            last = now
            if tokens < 1:  # a backlog goes out at `rate`, so a thin uplink is not swamped
                self._stop.wait((1 - tokens) / self.rate)
                # the wait earned exactly this token: counting it again from `last` doubled the rate
                tokens, last = 1.0, time.monotonic()
            try:
                # Only what may go out now: a control message that arrives meanwhile is picked next turn,
                # not after a batch that the rate spreads over seconds.
                batch = self._next(min(room, int(tokens)))
            except OutboxError as exc:
                self.last_error = str(exc)
                continue
            paho_full = False
            for msg in batch:
                if not self.link.connected or self._stop.is_set():
                    break
                if not self.link.fits(msg.topic, msg.payload):  # it would break the link on every try
                    self.link.too_large(msg.topic, msg.payload)
                    self._ack(msg.id)
                    continue
                sent_at = time.monotonic()
                info = self.link.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    # paho did not take it (its queue is full, e.g. at a reconnect): it stays on disk and
                    # is offered again from here, rather than waiting in flight for a PUBACK that never comes
                    paho_full = True
                    break
                tokens -= 1
                with self._lock:
                    # Only what was heard since this publish began is its PUBACK: paho's mids wrap
                    # after 65535, so an older entry is another message that had the same number.
                    early = self._heard.pop(info.mid, 0.0) >= sent_at
                    if not early:
                        self._inflight[info.mid] = msg.id
                if early:
                    self._ack(msg.id)
            if paho_full:
                self._stop.wait(0.1)  # paho's queue drains as the broker acknowledges
            if batch:
                self._wake.set()  # more may be waiting
        with suppress(OutboxError):
            self.outbox.delete_acked()  # what was acknowledged is not sent again after a restart

    def _next(self, room: int) -> list:
        """Up to ``room`` messages not in flight: control, then live (the newest), then the backlog."""
        assert self.outbox is not None
        with self._lock:
            busy = list(self._inflight.values())
        batch = self.outbox.peek(limit=room, lane=CONTROL, exclude=busy)
        if len(batch) < room:
            live = self.outbox.peek(limit=room - len(batch), lane=DATA, exclude=busy, newest=True)
            cutoff = time.time() - LIVE_S
            batch += [m for m in live if m.created >= cutoff]
        if len(batch) < room:
            batch += self.outbox.peek(limit=room - len(batch), lane=DATA, exclude=busy + [m.id for m in batch])
        return batch
