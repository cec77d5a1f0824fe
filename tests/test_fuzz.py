"""Bad input on every topic the agent listens to gets an error, never a crash or a stalled frame loop."""

from __future__ import annotations

import json

import pytest
from conftest import agent_config, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, ConfigError, parse_config
from agent.deploy.manifest import ManifestRejected, parse_manifest

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
manifest_like = st.fixed_dictionaries(
    {},
    optional={
        "deployment_id": st.one_of(st.text(max_size=20), st.integers(), st.just("../../x")),
        "model": st.dictionaries(st.sampled_from(["name", "version", "format", "sha256", "size", "task", "labels"]),
                                 json_values, max_size=7),
        "source": st.dictionaries(st.sampled_from(["type", "chunks", "chunk_size", "url"]), json_values, max_size=4),
        "golden": json_values,
        "signature": st.one_of(st.text(max_size=20), st.integers()),
        "extra": json_values,
    },
)


@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                 manifest_like.map(lambda v: json.dumps(v).encode())))
@settings(max_examples=300, deadline=None)
def test_any_manifest_payload_is_parsed_or_rejected_with_a_reason(payload):
    try:
        parse_manifest(payload)
    except ManifestRejected as exc:
        assert str(exc)


@given(st.dictionaries(st.sampled_from(["device_id", "groups", "mqtt", "camera", "model", "runtime", "health",
                                        "deploy", "state_dir", "bogus"]), json_values, max_size=6))
@settings(max_examples=300, deadline=None)
def test_any_config_document_is_accepted_or_explained_key_by_key(doc):
    try:
        assert isinstance(parse_config(doc, environ={}), AgentConfig)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and ":" in p for p in exc.problems)


@pytest.fixture
def live_agent(broker, recorder_factory, agent_factory, tmp_path):
    cfg = agent_config(broker, tmp_path, groups=["lobby"])
    agent = agent_factory(cfg).start()
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/#")
    rec.wait_json("/status", lambda s: s["state"] == "online")
    return cfg, agent, rec


def test_fuzzed_messages_on_every_input_topic_never_stop_the_frame_loop(live_agent):
    cfg, agent, rec = live_agent
    dev = cfg["device_id"]
    topics = [f"edge/{dev}/cmd", f"edge/{dev}/deploy", f"edge/{dev}/deploy/fuzz-1/chunk/0",
              f"edge/{dev}/deploy/../../chunk/x", "edge/groups/lobby/deploy", "edge/groups/lobby/deploy/a/chunk/1"]
    client = rec.client

    @given(topic=st.sampled_from(topics),
           payload=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                             manifest_like.map(lambda v: json.dumps(v).encode()),
                             st.fixed_dictionaries({"command": st.one_of(st.text(max_size=10), json_values),
                                                    "request_id": json_values}).map(lambda v: json.dumps(v).encode())),
           retain=st.booleans())
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    def send(topic, payload, retain):
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    send()
    # a huge payload on the command and deploy topics
    for topic in topics[:2]:
        client.publish(topic, b"{" + b" " * (3 * 2**20) + b"}", qos=1).wait_for_publish(10)
    # a retained command is ignored, an unknown one is answered with an error
    client.publish(f"edge/{dev}/cmd", b'{"command": "reboot", "request_id": "r-retained"}', qos=1,
                   retain=True).wait_for_publish(5)
    client.publish(f"edge/{dev}/cmd", b'{"command": "reboot", "request_id": "r-1"}', qos=1).wait_for_publish(5)
    resp = rec.wait_json("/cmd/response", lambda r: r.get("request_id") == "r-1")[0]
    assert resp["ok"] is False and "unknown command" in resp["error"]
    assert not [r for r in rec.json("/cmd/response") if r.get("request_id") == "r-retained"]
    bad = rec.wait_json("/cmd/response", lambda r: r["ok"] is False)
    assert all(r["error"] for r in bad)
    for topic in topics:  # leave no retained junk behind for other tests
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)

    n = len(rec.json("/predictions"))
    rec.wait_json("/predictions", count=n + 10, timeout=20)
    assert agent.proc.poll() is None
    assert "Traceback" not in agent.log(), agent.log()[-2000:]
    wait_until(lambda: rec.json("/health"), 10, what="health")


def test_a_command_nested_too_deeply_to_parse_is_answered_and_the_next_one_too(live_agent):
    cfg, agent, rec = live_agent
    dev = cfg["device_id"]
    rec.client.publish(f"edge/{dev}/cmd", b"[" * 60_000, qos=1).wait_for_publish(5)  # within the 64 KiB limit
    rec.client.publish(f"edge/{dev}/cmd", b'{"command": "status", "request_id": "after"}', qos=1).wait_for_publish(5)
    nested = rec.wait_json("/cmd/response", lambda r: r["ok"] is False)[0]
    assert nested["request_id"] is None and "nested too deeply" in nested["error"]
    assert rec.wait_json("/cmd/response", lambda r: r.get("request_id") == "after")[0]["ok"] is True
    assert "Traceback" not in agent.log(), agent.log()[-2000:]


def test_chunks_too_small_to_be_worth_their_bookkeeping_are_refused():
    raw = {"deployment_id": "tiny-chunks", "source": {"type": "mqtt", "chunks": 1000, "chunk_size": 1},
           "model": {"name": "m", "version": "1", "format": "onnx", "sha256": "0" * 64, "size": 1000, "task": "raw"}}
    with pytest.raises(ManifestRejected, match="chunks of 1 bytes are too small: at least 16384"):
        parse_manifest(json.dumps(raw).encode())
    raw["source"] = {"type": "mqtt", "chunks": 1, "chunk_size": 1000}  # one small chunk is fine
    assert parse_manifest(json.dumps(raw).encode())[1].source.chunks == 1
