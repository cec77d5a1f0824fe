"""The prediction publisher against a real mosquitto: everything delivered in order, batched only at full rate."""

from __future__ import annotations

import json
import time

from conftest import Recorder, wait_until

from agent.config import MqttConfig
from agent.model import ModelInfo, Timings
from agent.mqtt import MqttLink
from agent.pipeline import Prediction
from agent.publisher import LINGER_BELOW_S, PredictionPublisher

INFO = ModelInfo("m", "1", "0" * 64, "tflite", "detection", "/m.tflite")


def _pred(seq: int, ts: float) -> Prediction:
    return Prediction(seq, "boot", ts, ts, INFO, "detection", Timings(0.1, 1.0, 0.1), [])


def _publisher(broker, maxsize: int = 256):
    link = MqttLink(MqttConfig(url=broker.url), "pub-test")
    link.start()
    assert link.wait_connected(5)
    pub = PredictionPublisher(link, "t/predictions", 0, maxsize=maxsize)
    pub.start()
    return link, pub


def test_full_rate_predictions_go_out_in_batches_all_of_them_in_order(broker):
    rec = Recorder(broker, "t/predictions")
    link, pub = _publisher(broker)
    try:
        t = time.time()
        for seq in range(1, 201):  # made 1 ms apart, as a fast model at full rate makes them
            pub.submit(_pred(seq, t + seq * 0.001))
            time.sleep(0.001)
        got = wait_until(lambda: m if len(m := rec.json("/predictions")) >= 200 else None, 10, what="200 predictions")
    finally:
        pub.stop()
        link.stop()
        rec.close()
    assert [m["seq"] for m in got] == list(range(1, 201))
    assert pub.batches < 50, f"{pub.batches} sends for 200 predictions: not batched"


def test_camera_rate_predictions_are_sent_one_by_one_without_waiting(broker):
    rec = Recorder(broker, "t/predictions")
    link, pub = _publisher(broker)
    try:
        for seq in range(1, 11):
            pub.submit(_pred(seq, time.time()))
            time.sleep(2 * LINGER_BELOW_S)  # slower than the batching threshold
        got = wait_until(lambda: m if len(m := rec.json("/predictions")) >= 10 else None, 10, what="10 predictions")
    finally:
        pub.stop()
        link.stop()
        rec.close()
    assert [m["seq"] for m in got] == list(range(1, 11))
    assert pub.batches == 10
    assert got[0]["model"]["name"] == "m" and got[0]["latency_ms"]["inference"] == 1.0


def test_very_fast_predictions_are_not_dropped_while_a_batch_gathers(broker):
    # A 20 ms window must not gather more than the publisher's queue holds: it shrinks with the
    # rate. With a queue of 32, ~2,800 predictions/s (bursts of 3 per ms) overflow a fixed 20 ms
    # window (the same holds for the real 256 above 12,800/s), while the publisher itself keeps up
    # with that rate on a slow machine too.
    from agent.bench import BulkSubscriber  # paho's subscriber would take the GIL from the publisher

    sub = BulkSubscriber(broker.port, ["t/predictions"])
    link, pub = _publisher(broker, maxsize=32)
    n = 600
    try:
        t = time.time()
        for seq in range(1, n + 1):
            pub.submit(_pred(seq, t + seq * 0.0003))
            if seq % 3 == 0:
                time.sleep(0.001)
        got = wait_until(lambda: m if len(m := sub.messages()) >= n - pub.dropped else None, 20,
                         what="every prediction not dropped")
    finally:
        pub.stop()
        link.stop()
        sub.close()
    assert pub.dropped == 0
    assert [json.loads(p)["seq"] for _, _, p in got] == list(range(1, n + 1))
