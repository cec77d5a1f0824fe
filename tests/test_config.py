"""Bad configuration gets one line per problem naming the key, exit code 2, and never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from agent.config import ConfigError, load_config, parse_config


def problems(data: dict, environ: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, environ=environ or {})
    return exc.value.problems


def test_bundled_config_is_valid_and_finds_the_bundled_model():
    cfg = load_config(REPO / "config" / "agent.yaml", environ={})
    assert cfg.model.path == REPO / "models" / "face" / "blazeface.tflite"
    assert cfg.mqtt.url == "mqtt://127.0.0.1:1883" and cfg.mqtt.prefix == "edge"
    assert cfg.camera.source == "auto" and cfg.camera.fps == 15


def test_a_word_where_a_number_goes_names_the_key_and_the_value():
    assert problems({"camera": {"fps": "fast"}}) == ["camera.fps: expected a number, got 'fast'"]


def test_every_problem_is_reported_not_just_the_first():
    lines = problems({"camera": {"fps": "fast", "sorce": "x"}, "mqtt": {"url": "http://x", "predictions_qos": 2},
                      "runtime": {"backend": "tensorflow"}})
    assert "camera.sorce: unknown key (check the spelling against config/agent.yaml)" in lines
    assert "mqtt.url: expected mqtt://host:port or mqtts://host:port, got 'http://x'" in lines
    assert "mqtt.predictions_qos: expected 0 or 1, got 2" in lines
    assert any(line.startswith("runtime.backend: expected 'auto', 'tflite' or 'onnxruntime'") for line in lines)
    assert len(lines) == 5


def test_typo_at_the_top_level_is_an_error():
    assert problems({"devce_id": "x"}) == ["devce_id: unknown key (check the spelling against config/agent.yaml)"]


def test_device_id_that_would_break_topics_is_refused():
    assert problems({"device_id": "a/b"})[0].startswith("device_id: expected a name without '/'")


def test_mutual_tls_needs_cert_and_key_together():
    assert any("cert_file and key_file go together" in p for p in problems({"mqtt": {"cert_file": "/c.pem"}}))


def test_environment_overrides_nested_keys_with_yaml_types():
    cfg = parse_config({"camera": {"fps": 15}}, environ={
        "EDGE_AGENT__CAMERA__FPS": "5", "EDGE_AGENT__CAMERA__LOOP": "false",
        "EDGE_AGENT__MQTT__URL": "mqtt://broker.local:1884", "EDGE_AGENT__DEVICE_ID": "cam-07",
        "EDGE_AGENT__GROUPS": "[lobby, door]",
    })
    assert cfg.camera.fps == 5.0 and cfg.camera.loop is False
    assert cfg.mqtt.url == "mqtt://broker.local:1884" and cfg.device_id == "cam-07"
    assert cfg.groups == ["lobby", "door"]


def test_a_bad_environment_override_is_reported_like_a_bad_file_value_and_names_the_variable():
    assert problems({}, {"EDGE_AGENT__HEALTH__INTERVAL_S": "often"}) == [
        "health.interval_s (from EDGE_AGENT__HEALTH__INTERVAL_S): expected a number, got 'often'"]


def test_yaml_syntax_error_says_where(tmp_path: Path):
    f = tmp_path / "agent.yaml"
    f.write_text("camera:\n  fps: [15\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f, environ={})
    assert exc.value.problems[0].startswith("line ")
    assert "not valid YAML" in exc.value.problems[0]


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path):
    f = tmp_path / "agent.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(f, environ={})


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_daemon_with_a_bad_file_exits_2_with_one_line_per_problem(tmp_path: Path):
    f = tmp_path / "agent.yaml"
    f.write_text("camera:\n  fps: fast\nmqtt:\n  urll: x\n")
    r = _run("agent.daemon", "--config", str(f))
    assert r.returncode == 2
    assert "camera.fps: expected a number, got 'fast'" in r.stderr
    assert "mqtt.urll: unknown key" in r.stderr
    assert "Traceback" not in r.stderr


def test_daemon_with_a_missing_file_exits_2(tmp_path: Path):
    r = _run("agent.daemon", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "file not found" in r.stderr and "Traceback" not in r.stderr


def test_daemon_with_a_missing_model_exits_2_with_the_path(tmp_path: Path):
    f = tmp_path / "agent.yaml"
    f.write_text(f"model:\n  path: {tmp_path / 'missing.tflite'}\nstate_dir: {tmp_path / 'state'}\n")
    r = _run("agent.daemon", "--config", str(f))
    assert r.returncode == 2
    assert "missing.tflite" in r.stderr and "Traceback" not in r.stderr


def test_config_check_exits_0_for_a_good_file_and_2_for_a_bad_one(tmp_path: Path):
    good = _run("agent.ctl", "config", "check", str(REPO / "config" / "agent.yaml"))
    assert good.returncode == 0 and "ok" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("camera:\n  fps: fast\n")
    r = _run("agent.ctl", "config", "check", str(bad))
    assert r.returncode == 2
    assert "camera.fps: expected a number, got 'fast'" in r.stderr and "Traceback" not in r.stderr


def test_config_check_catches_a_model_path_that_does_not_exist(tmp_path: Path):
    f = tmp_path / "agent.yaml"
    f.write_text("model:\n  path: /nonexistent/model.tflite\n")
    r = _run("agent.ctl", "config", "check", str(f))
    assert r.returncode == 2 and "model.path: file not found: /nonexistent/model.tflite" in r.stderr


def test_credentials_in_the_broker_url_are_refused_without_echoing_them():
    lines = problems({"mqtt": {"url": "mqtts://cam:hunter2@broker:8883"}})
    assert len(lines) == 1 and lines[0].startswith("mqtt.url: credentials in the URL are not accepted")
    assert "hunter2" not in lines[0]


def test_the_bundled_config_states_the_real_defaults():
    """config/agent.yaml documents the defaults: it must say what the code does with an empty file."""
    bundled = load_config(REPO / "config" / "agent.yaml", environ={})
    empty = parse_config({}, environ={})
    for section in ("mqtt", "camera", "runtime", "health", "deploy"):
        assert getattr(bundled, section) == getattr(empty, section), section
    assert (bundled.groups, bundled.state_dir, bundled.log_level) == (empty.groups, empty.state_dir, empty.log_level)
    assert bundled.model.path == empty.model.path


def test_daemon_with_a_state_dir_it_cannot_create_exits_2_and_says_what_to_do(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    f = tmp_path / "agent.yaml"
    f.write_text(f"state_dir: {blocker / 'state'}\ncamera:\n  source: synthetic\n")
    r = _run("agent.daemon", "--config", str(f))
    assert r.returncode == 2
    assert "state_dir" in r.stderr and "EDGE_AGENT__STATE_DIR" in r.stderr and "Traceback" not in r.stderr


def test_config_check_catches_what_the_daemon_would_refuse_later(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    f = tmp_path / "agent.yaml"
    f.write_text(f"runtime:\n  accelerator: cuda\nstate_dir: {blocker / 'state'}\n")
    r = _run("agent.ctl", "config", "check", str(f))
    assert r.returncode == 2, r.stderr
    assert "runtime: accelerator 'cuda' needs an .onnx model on onnxruntime" in r.stderr
    assert f"state_dir: {blocker} is not a directory" in r.stderr and "Traceback" not in r.stderr


def test_a_key_given_twice_is_an_error_not_a_silent_last_one_wins(tmp_path: Path):
    f = tmp_path / "agent.yaml"
    f.write_text("camera:\n  fps: 5\n  source: synthetic\n  fps: 30\n")
    with pytest.raises(ConfigError) as err:
        load_config(f, environ={})
    assert err.value.problems == ["line 4, column 3: not valid YAML (duplicate key 'fps' (first at line 2); "
                                  "the file would mean only the last one)"]


def test_an_override_from_the_environment_is_named_in_its_error_and_the_file_is_not_blamed(tmp_path: Path):
    f = tmp_path / "agent.yaml"
    f.write_text("camera:\n  fps: fast\n  width: wide\n")
    with pytest.raises(ConfigError) as err:
        load_config(f, environ={"EDGE_AGENT__CAMERA__FPS": "quick"})
    assert err.value.problems == ["camera.fps (from EDGE_AGENT__CAMERA__FPS): expected a number, got 'quick'",
                                  "camera.width: expected an integer, got 'wide'"]


def test_an_outbox_too_small_for_one_message_is_refused_by_the_config():
    lines = problems({"mqtt": {"outbox_max_mb": 0.0005}})
    assert lines == ["mqtt.outbox_max_mb: Input should be greater than or equal to 1, got 0.0005"]


def test_http_off_loopback_needs_a_token_and_listen_must_be_host_port():
    (p,) = problems({"http": {"listen": "0.0.0.0:8080"}})
    assert p.startswith("http: http.listen 0.0.0.0:8080 is not a loopback address: set http.token_file")
    open_ = parse_config({"http": {"listen": "0.0.0.0:8080", "token_file": "/etc/edge-agent/token"}}, environ={})
    assert open_.http.host_port == ("0.0.0.0", 8080) and not open_.http.loopback
    for loopback in ("127.0.0.1:8080", "[::1]:8080", "localhost:9", ""):
        assert parse_config({"http": {"listen": loopback}}, environ={}).http.listen == loopback
    for bad in ("8080", "host:", ":80", "h:99999", "h:http"):
        assert problems({"http": {"listen": bad}})[0].startswith("http.listen: expected host:port"), bad
    assert any("http.cert_file and http.key_file go together" in p for p in problems({"http": {"cert_file": "/c"}}))
    assert problems({"homeassistant": {"prefix": "ha/#"}})[0].startswith("homeassistant.prefix: expected a topic prefix")


def test_config_check_refuses_an_open_listen_without_a_token(tmp_path: Path):
    bad = tmp_path / "open.yaml"
    bad.write_text("http:\n  listen: 0.0.0.0:8080\n")
    r = _run("agent.ctl", "config", "check", str(bad))
    assert r.returncode == 2 and "http.token_file" in r.stderr and "Traceback" not in r.stderr


def test_the_http_token_file_is_found_beside_the_config(tmp_path: Path):
    (tmp_path / "token").write_text("x" * 32)
    (tmp_path / "agent.yaml").write_text("http:\n  listen: 0.0.0.0:8080\n  token_file: token\n")
    assert load_config(tmp_path / "agent.yaml").http.token_file == tmp_path / "token"


def test_config_check_reads_the_http_token_and_certificate_as_the_daemon_would(tmp_path: Path):
    (tmp_path / "short").write_text("abc")
    (tmp_path / "agent.yaml").write_text("http:\n  listen: 0.0.0.0:8080\n  token_file: short\n"
                                         "  cert_file: nope.pem\n  key_file: nope.key\n")
    r = _run("agent.ctl", "config", "check", str(tmp_path / "agent.yaml"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "http.token_file" in r.stderr and "at least 16 characters" in r.stderr
    assert "http.cert_file/key_file: cannot load them" in r.stderr
