"""Predictions to MQTT: decoded, JSON-encoded and published on their own thread, off the frame loop."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.inference.pipeline import Prediction
from agent.messaging.link import MqttLink
from agent.messaging.payloads import dumps
from agent.support.threads import name_this_thread

log = logging.getLogger(__name__)
# Batch predictions only when they are made faster than this (100/s). Each send wakes paho's thread
# and the broker: at 150 predictions/s, sending each at once cost 0.28 + 0.16 ms of CPU per prediction
# in the publisher and paho's thread, against 0.20 + 0.10 in 20 ms batches (benchmarks.md).
LINGER_BELOW_S = 0.010
LINGER_S = 0.020  # at full rate on 2 cores, 20 ms batches gave MobileNetV2 ~6 % more fps than 3 ms ones


class PredictionPublisher:
    """JSON-encodes and publishes predictions on its own thread, off the frame loop.

    What is submitted goes through ``finish`` first when one is set (the daemon sets
    ``Pipeline.finish``: the frame loop submits raw outputs, decoded here); ``finish`` returning None
    means there is nothing to publish for that item. Items need a ``ts`` (when they were made).
    """

    def __init__(self, link: MqttLink, topic: str, qos: int, maxsize: int = 256, durable=None,
                 finish: Callable[[Any], Prediction | None] | None = None):
        self.link, self.topic, self.qos = link, topic, qos
        self.durable = durable
        self.finish = finish
        self.dropped = 0
        self.published = 0  # predictions handed to the link or the outbox
        self.unsent = 0  # QoS 0 predictions the link could not take (no connection, too large)
        self.observe: Callable[[Prediction], None] | None = None  # sees each prediction (the web page, Home Assistant)
        self.batches = 0  # sends of one or more predictions (health shows nothing of it; tests read it)
        self._q: queue.Queue[Any] = queue.Queue(maxsize)
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, pred: Any) -> None:
        try:
            self._q.put_nowait(pred)
        except queue.Full:  # the link is stuck: keep the newest, count the loss
            try:
                self._q.get_nowait()
                self.dropped += 1
            except queue.Empty:
                pass
            self._q.put_nowait(pred)

    def stop(self, timeout: float = 2.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        name_this_thread("ea-publisher")
        prev_ts = 0.0  # when the last prediction sent was made
        while True:
            pred = self._q.get()
            if pred is None:
                return
            interval = pred.ts - prev_ts
            if interval < LINGER_BELOW_S:
                # Predictions are being made faster than every 10 ms: gather LINGER_S of them and send
                # them together, so the MQTT thread wakes once per batch instead of once per frame.
                # At camera rates (up to 100 fps) this never triggers and adds no latency. At very
                # high rates the window shrinks so that a batch fills at most a quarter of the queue.
                time.sleep(min(LINGER_S, max(interval, 0.0) * self._q.maxsize / 4))
            batch = [pred]
            while True:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._send(batch)
                    return
                batch.append(nxt)
            prev_ts = batch[-1].ts
            self.batches += 1
            self._send(batch)

    def _send(self, batch: list[Any]) -> None:
        # Every payload of the batch is made first, then they go out back to back: each publish wakes
        # paho's network thread, which then wants the GIL, so decoding between two publishes would
        # hand the GIL to and fro once per message instead of once per batch.
        finish = self.finish
        payloads = []
        pred = None
        for item in batch:
            try:
                pred = finish(item) if finish is not None else item
                if pred is not None:
                    payloads.append(dumps(pred.to_json()))
            except Exception:  # noqa: BLE001
                log.exception("encoding a prediction failed")
        if self.observe is not None and pred is not None:
            try:
                self.observe(pred)  # the batch's newest
            except Exception:  # noqa: BLE001
                log.exception("a prediction observer failed")
        durable = self.durable if self.qos else None
        for payload in payloads:
            try:
                if durable is not None:
                    durable.submit(self.topic, payload, qos=self.qos)
                    self.published += 1
                elif self.link.publish(self.topic, payload, qos=self.qos):
                    self.published += 1
                else:
                    self.unsent += 1
            except Exception:  # noqa: BLE001
                log.exception("publishing a prediction failed")
