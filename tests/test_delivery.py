"""The durable sender against a real mosquitto: a QoS 1 message leaves the outbox only on its PUBACK."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

from conftest import wait_until

from agent.config import MqttConfig
from agent.messaging import delivery
from agent.messaging.delivery import DurableSender
from agent.messaging.link import MqttLink
from agent.messaging.outbox import Outbox


def test_qos0_traffic_never_stands_in_for_the_puback_of_a_later_qos1_message(broker, tmp_path: Path):
    # paho numbers every publish from one counter that wraps after 65535, QoS 0 ones included, and
    # calls on_publish for a QoS 0 message as soon as it is written. Predictions go out at QoS 0 by
    # default, so after one round of the counter each new QoS 1 message reuses the number of a
    # QoS 0 message whose "publish" was heard long ago: that must not count as its PUBACK.
    link = MqttLink(MqttConfig(url=broker.url), "durable-test")
    sender = DurableSender(link, Outbox(tmp_path / "outbox.db"))
    link.start()
    try:
        assert link.wait_connected(5)
        sender.start()
        for _ in range(65535):
            link.publish("t/predictions", b"{}", qos=0)
        wait_until(lambda: not link.client.want_write(), 30, what="the QoS 0 messages written")
        time.sleep(0.5)  # paho's thread has called on_publish for the last of them
        broker.proc.send_signal(signal.SIGSTOP)  # takes the bytes, acknowledges nothing
        try:
            sender.submit("t/health", b'{"ok":true}', qos=1)
            time.sleep(1.0)
            assert sender.depth == 1, "a QoS 1 message left the outbox without a PUBACK"
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: sender.depth == 0, 10, what="the PUBACK removing it")
    finally:
        sender.stop(flush_s=0)
        link.stop()


def test_a_message_paho_would_not_queue_is_offered_again_not_left_waiting_for_a_puback(broker, recorder_factory,
                                                                                       tmp_path: Path):
    # paho refuses a publish when its own queue is full (MQTT_ERR_QUEUE_SIZE), as at a reconnect after an
    # outage; such a message was booked in flight under a PUBACK that never comes, and once the window
    # was full of them the outbox stopped sending for good.
    rec = recorder_factory(broker, "t/#")
    link = MqttLink(MqttConfig(url=broker.url), "durable-queue-test")
    link.client.max_queued_messages_set(4)
    sender = DurableSender(link, Outbox(tmp_path / "outbox.db"), window=8)
    link.start()
    try:
        assert link.wait_connected(5)
        broker.proc.send_signal(signal.SIGSTOP)  # takes the bytes, acknowledges nothing: paho's queue fills
        try:
            sender.start()
            for i in range(40):
                sender.submit("t/health", f'{{"n":{i}}}'.encode(), qos=1)
            time.sleep(1.0)
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: sender.depth == 0, 20, what="the whole outbox delivered")
        wait_until(lambda: {m["n"] for m in rec.json("/health")} == set(range(40)), 10, what="all 40 arrived")
    finally:
        sender.stop(flush_s=0)
        link.stop()


def test_a_backlog_drains_at_the_configured_rate_not_twice_it(broker, recorder_factory, tmp_path: Path):
    rec = recorder_factory(broker, "t/#")
    link = MqttLink(MqttConfig(url=broker.url), "durable-rate-test")
    outbox = Outbox(tmp_path / "outbox.db")
    for i in range(264):  # queued while "offline": the backlog a reconnect finds
        outbox.put("t/backlog", f'{{"n":{i}}}'.encode(), qos=1)
    sender = DurableSender(link, outbox, rate=100.0, window=64)
    link.start()
    try:
        assert link.wait_connected(5)
        t0 = time.monotonic()
        sender.start()
        wait_until(lambda: len(rec.json("/backlog")) == 264, 30, what="the backlog delivered")
        took = time.monotonic() - t0
    finally:
        sender.stop(flush_s=0)
        link.stop()
    # 64 at once (the window's burst), then 200 at 100/s: 2 s; the double count made it 1 s
    assert took > 1.7, f"{264 / took:.0f} messages/s drained; configured 100 (after a burst of 64)"


def test_control_events_and_live_predictions_go_out_before_an_outages_backlog(broker, recorder_factory,
                                                                              tmp_path: Path, monkeypatch):
    monkeypatch.setattr(delivery, "LIVE_S", 0.5)  # the backlog below is "old" after half a second, not two
    rec = recorder_factory(broker, "t/#")
    link = MqttLink(MqttConfig(url=broker.url), "durable-lanes-test")
    outbox = Outbox(tmp_path / "outbox.db")
    for i in range(1000):  # an outage's predictions: 20 s of sending at 50/s
        outbox.put("t/backlog", f'{{"n":{i}}}'.encode(), qos=1)
    time.sleep(0.6)
    sender = DurableSender(link, outbox, rate=50.0, window=64)
    link.start()
    try:
        assert link.wait_connected(5)
        sender.start()
        wait_until(lambda: len(rec.json("/backlog")) >= 64, 10, what="the backlog's first window")
        t0 = time.monotonic()
        sender.submit("t/event", b'{"state": "downloading"}', qos=1, control=True)
        sender.submit("t/live", b'{"seq": 1}', qos=1)
        wait_until(lambda: rec.json("/event") and rec.json("/live"), 5, what="the event and the live prediction")
        took = time.monotonic() - t0
        behind = len(rec.json("/backlog"))
    finally:
        sender.stop(flush_s=0)
        link.stop()
    assert took < 1.0, f"the deployment event and the live prediction waited {took:.1f} s"
    assert behind < 200, f"they went out after {behind} of the backlog's 1000 messages"
    assert outbox.depth() > 500  # the backlog goes on draining at its rate, after them
    backlog = [m["n"] for m in rec.json("/backlog")]
    assert backlog == sorted(backlog)  # the backlog itself stays in order


def test_an_outbox_written_before_lanes_existed_opens_and_sends_its_messages(broker, recorder_factory,
                                                                             tmp_path: Path):
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as conn:  # the schema of the previous release
        conn.executescript("""CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
            payload BLOB NOT NULL, qos INT NOT NULL, retain INT NOT NULL, created REAL NOT NULL);
            CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);""")
        conn.executemany("INSERT INTO messages (topic, payload, qos, retain, created) VALUES (?, ?, 1, 0, ?)",
                         [("t/old", f'{{"n":{i}}}'.encode(), time.time() - 60) for i in range(5)])
    rec = recorder_factory(broker, "t/#")
    link = MqttLink(MqttConfig(url=broker.url), "durable-old-schema-test")
    sender = DurableSender(link, Outbox(path), rate=100.0)
    link.start()
    sender.start()
    try:
        wait_until(lambda: len(rec.json("/old")) == 5, 10, what="the old outbox's messages")
    finally:
        sender.stop()
        link.stop()
    assert [m["n"] for m in rec.json("/old")] == [0, 1, 2, 3, 4]
