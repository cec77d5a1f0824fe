"""The prediction publisher against a real mosquitto: everything delivered in order, batched only at full rate."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from conftest import wait_until

from agent.config import MqttConfig
from agent.ctl.bench.subscriber import BulkSubscriber
from agent.inference.loaded import ModelInfo, Timings
from agent.inference.pipeline import Prediction
from agent.messaging.link import MqttLink
from agent.messaging.publisher import LINGER_BELOW_S, PredictionPublisher

INFO = ModelInfo("m", "1", "0" * 64, "tflite", "detection", "/m.tflite")


def _pred(seq: int, ts: float) -> Prediction:
    return Prediction(seq, "boot", ts, ts, INFO, "detection", Timings(0.1, 1.0, 0.1), [])


@contextmanager
def _publishing(broker, maxsize: int = 256) -> Iterator[tuple[PredictionPublisher, Callable[[int], list[dict]]]]:
    """A started publisher, and ``received(n)``: the first ``n`` predictions a subscriber got, decoded.

    The subscriber is the bench's bulk one: paho's, in this process, would take the GIL from the
    publisher at the rates tested here.
    """
    sub = BulkSubscriber(broker.port, ["t/predictions"])
    link = MqttLink(MqttConfig(url=broker.url), "pub-test")
    link.start()
    pub = PredictionPublisher(link, "t/predictions", 0, maxsize=maxsize)
    pub.start()

    def received(n: int) -> list[dict]:
        got = wait_until(lambda: m if len(m := sub.messages()) >= n else None, 20, what=f"{n} predictions")
        return [json.loads(payload) for _, _, payload in got]

    try:
        assert link.wait_connected(5)
        yield pub, received
    finally:
        pub.stop()
        link.stop()
        sub.close()


def test_full_rate_predictions_go_out_in_batches_all_of_them_in_order(broker):
    with _publishing(broker) as (pub, received):
        t = time.time()
        for seq in range(1, 201):  # made 1 ms apart, as a fast model at full rate makes them
            pub.submit(_pred(seq, t + seq * 0.001))
            time.sleep(0.001)
        got = received(200)
    assert [m["seq"] for m in got] == list(range(1, 201))
    assert pub.batches < 50, f"{pub.batches} sends for 200 predictions: not batched"


def test_camera_rate_predictions_are_sent_one_by_one_without_waiting(broker):
    with _publishing(broker) as (pub, received):
        for seq in range(1, 11):
            pub.submit(_pred(seq, time.time()))
            time.sleep(2 * LINGER_BELOW_S)  # slower than the batching threshold
        got = received(10)
    assert [m["seq"] for m in got] == list(range(1, 11))
    assert pub.batches == 10
    assert got[0]["model"]["name"] == "m" and got[0]["latency_ms"]["inference"] == 1.0


def test_very_fast_predictions_are_not_dropped_while_a_batch_gathers(broker):
    # A 20 ms window must not gather more than the publisher's queue holds: it shrinks with the
    # rate. With a queue of 32, ~2,800 predictions/s (bursts of 3 per ms) overflow a fixed 20 ms
    # window (the same holds for the real 256 above 12,800/s), while the publisher itself keeps up
    # with that rate on a slow machine too.
    n = 600
    with _publishing(broker, maxsize=32) as (pub, received):
        t = time.time()
        for seq in range(1, n + 1):
            pub.submit(_pred(seq, t + seq * 0.0003))
            if seq % 3 == 0:
                time.sleep(0.001)
        got = received(n - pub.dropped)
    assert pub.dropped == 0
    assert [m["seq"] for m in got] == list(range(1, n + 1))


def test_a_prediction_that_cannot_be_encoded_is_skipped_and_the_rest_of_its_batch_still_goes_out(broker):
    # A NaN is refused by the JSON encoder; at full rate that prediction shares a batch with others.
    bad = Prediction(3, "boot", 0.0, 0.0, INFO, "detection", Timings(0.1, float("nan"), 0.1), [])
    with _publishing(broker) as (pub, received):
        t = time.time()
        for seq in range(1, 7):
            pub.submit(bad if seq == 3 else _pred(seq, t + seq * 0.001))
        got = received(5)
        time.sleep(0.1)  # nothing else arrives
        assert [m["seq"] for m in received(5)] == [1, 2, 4, 5, 6]
    assert [m["seq"] for m in got] == [1, 2, 4, 5, 6]
    assert pub.batches < 6, "sent one by one: the test did not exercise a batch"
