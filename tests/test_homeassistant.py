"""Home Assistant MQTT discovery: the config's shape by the rules of Home Assistant's MQTT docs, and the
agent publishing it (and its state topics) on a real mosquitto, again when Home Assistant comes online."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import paho.mqtt.client as paho
from conftest import agent_config, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from agent.messaging.homeassistant import HaTopics, HomeAssistant, detection_summary, discovery_payload
from agent.messaging.topics import Topics
from agent.vision.results import Detection

# Entity platforms Home Assistant's MQTT integration discovers (the ones used here), and what each
# must be given by its docs: a state or command topic.
NEEDS = {"sensor": ("state_topic",), "binary_sensor": ("state_topic",), "button": ("command_topic",),
         "update": ("state_topic",), "image": ("image_topic",)}


def check_discovery(config: dict, topics: Topics) -> None:
    """The device-based discovery rules: device with identifiers, origin with a name, and per component a
    platform, a unique_id unique across the device, and the topic its platform needs."""
    dev = config["device"]
    assert dev["identifiers"] and dev["name"] and dev["sw_version"] and dev["model"]
    assert config["origin"]["name"] == "edge-agent"
    (avail,) = config["availability"]
    assert avail["topic"] == topics.status and "value_json.state" in avail["value_template"]
    ids = []
    for key, cmp in config["components"].items():
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", key), key
        platform = cmp["p"]
        assert platform in NEEDS, platform
        for need in NEEDS[platform]:
            assert cmp.get(need), (key, need)
        ids.append(cmp["unique_id"])
    assert len(ids) == len(set(ids))


def test_the_discovery_config_follows_home_assistants_rules_and_its_ids_are_stable():
    topics = Topics("edge", "cam 01/x")
    ha = HaTopics.of(topics, "homeassistant")
    assert ha.discovery == "homeassistant/device/cam_01_x/config"
    config = discovery_payload(topics, ha, platform_model="Raspberry Pi 5", has_temperature=True)
    check_discovery(config, topics)
    assert config["device"]["identifiers"] == ["edge_agent_cam_01_x"]
    assert config["components"]["fps"]["unique_id"] == "edge_agent_cam_01_x_fps"
    again = discovery_payload(topics, ha, platform_model="Raspberry Pi 5", has_temperature=True)
    assert [c["unique_id"] for c in config["components"].values()] == \
        [c["unique_id"] for c in again["components"].values()]
    platforms = {c["p"] for c in config["components"].values()}
    assert platforms == {"sensor", "binary_sensor", "button", "update", "image"}
    assert config["components"]["temperature"]["entity_category"] == "diagnostic"
    assert "temperature" not in discovery_payload(topics, ha, platform_model="x", has_temperature=False)["components"]
    presses = {json.loads(c["payload_press"])["command"] for c in config["components"].values() if c["p"] == "button"}
    assert presses == {"rollback", "reload"}


def test_summaries_are_rate_limited_but_a_flip_goes_at_once_and_updates_follow_deployments():
    sent: list[tuple[str, bytes]] = []
    ha = HomeAssistant(Topics("edge", "d"), "homeassistant", lambda t, p, r: sent.append((t, p)),
                       platform_model="x", has_temperature=False, installed=lambda: "1.0.0")
    face = Detection("face", 0.9, (0.1, 0.1, 0.2, 0.2))
    ha.on_prediction([face], now=100.0)
    ha.on_prediction([face], now=100.5)  # within the second, same answer: nothing
    ha.on_prediction([], now=100.6)  # flipped: at once
    ha.on_prediction([], now=101.7)
    summaries = [json.loads(p) for t, p in sent if t.endswith("/ha/detection")]
    assert [s["detected"] for s in summaries] == [True, False, False]
    assert summaries[0] == detection_summary([face]) == {"detected": True, "count": 1, "label": "face", "score": 0.9}
    ha.on_event({"state": "received", "model": {"name": "m", "version": "2.0.0"}})
    ha.on_event({"state": "validating"})
    assert ha.update_state() == {"installed_version": "1.0.0", "latest_version": "2.0.0", "in_progress": True,
                                 "title": "edge-agent model", "release_summary": "deployment validating"}
    ha.on_event({"state": "active"})  # probation: still in progress
    assert ha.update_state()["in_progress"]
    ha.on_event({"state": "rolled_back"})
    assert ha.update_state()["in_progress"] is False and ha.update_state()["latest_version"] == "1.0.0"


def test_the_agent_announces_itself_and_again_when_home_assistant_comes_online(broker, recorder_factory,
                                                                             agent_factory, tmp_path, face_frames):
    frames, _ = face_frames
    cfg = agent_config(broker, tmp_path, homeassistant={"enabled": True, "prefix": "ha"},
                       camera={"source": f"images:{frames}", "fps": 15})
    device = cfg["device_id"]
    topics = Topics("edge", device)
    rec = recorder_factory(broker, "ha/#", f"edge/{device}/#")
    agent = agent_factory(cfg).start()
    discovery = f"ha/device/{device}/config"  # test ids are [a-z0-9-] already
    wait_until(lambda: [m for m in rec.messages if m[0] == discovery], 60, what="discovery")
    (topic, payload, retained) = [m for m in rec.messages if m[0] == discovery][0]
    config = json.loads(payload)
    check_discovery(config, topics)
    cmps = config["components"]
    # every topic an entity reads gets something (availability: the retained status)
    summary = rec.wait_json("/ha/detection", lambda s: s["detected"])[0]
    assert summary["label"] == "face" and summary["count"] == 1 and summary["score"] > 0.5
    rec.wait_json("/health")
    update = rec.wait_json("/ha/update")[0]
    assert update["installed_version"] == "1.0.0" and update["in_progress"] is False
    image = wait_until(lambda: [p for t, p, _ in rec.messages if t == cmps["frame"]["image_topic"]], 20, what="image")
    assert cv2.imdecode(np.frombuffer(image[0], np.uint8), cv2.IMREAD_COLOR).shape == (480, 640, 3)
    assert rec.json(topics.status)[-1]["state"] == "online"
    # a fresh subscriber (Home Assistant after a restart) finds discovery retained
    fresh = recorder_factory(broker, discovery)
    wait_until(lambda: fresh.messages and fresh.messages[0][2], 10, what="retained discovery")
    # Home Assistant's birth message: discovery goes out again
    before = sum(1 for m in rec.messages if m[0] == discovery)
    pub = paho.Client(CallbackAPIVersion.VERSION2)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    pub.publish("ha/status", b"online", qos=1).wait_for_publish(5)
    wait_until(lambda: sum(1 for m in rec.messages if m[0] == discovery) > before, 10, what="discovery again")
    pub.publish("ha/status", b"offline", qos=1).wait_for_publish(5)
    # the reload button: its press payload on its command topic gets an answer
    reload_btn = cmps["reload"]
    pub.publish(reload_btn["command_topic"], reload_btn["payload_press"].encode(), qos=1).wait_for_publish(5)
    reply = rec.wait_json("/cmd/response", lambda r: r["request_id"] == "homeassistant")[0]
    assert reply["ok"] is True
    pub.loop_stop()
    pub.disconnect()
    agent.stop()
    assert sum(1 for m in rec.messages if m[0] == discovery) == before + 1  # "offline" announced nothing
    assert rec.json(topics.status)[-1]["state"] == "offline"
