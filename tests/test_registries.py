"""A backend and a task are each one registration: a made-up model format, a backend that runs it and a
task that decodes it, all defined here, go through config, the probe, the loader, the frame loop and
the publisher of a real agent to a real broker, without a line of agent/ knowing them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import Recorder

from agent.config import ConfigError, parse_config
from agent.daemon.agent import Agent
from agent.deploy.manifest import ManifestRejected, parse_manifest
from agent.hardware.facts import HardwareFacts, RuntimeAvailability
from agent.runtimes import registry as runtimes
from agent.runtimes.base import ModelFormat, RuntimeChoice, RuntimeChoiceError, SessionInfo, TensorSpec
from agent.runtimes.choice import choose_runtime, probe
from agent.vision import registry as tasks
from agent.vision.registry import Task
from agent.vision.results import Classification

MAGIC = b"MEANMDL1"  # a "model" file: the magic, then 3 float32 channel weights


class MeanSession:
    """Weighted mean of each colour channel of a 16x16 RGB input: a model small enough to read."""

    reuses_outputs = False
    metadata: dict[str, str] = {}

    def __init__(self, path: Path):
        self.weights = np.frombuffer(path.read_bytes()[len(MAGIC):], np.float32).copy()
        self.info = SessionInfo(backend="meanrt", accelerator="cpu", module="meanrt 1.0")
        self.inputs = (TensorSpec("image", (1, 16, 16, 3), np.dtype(np.float32)),)
        self.outputs = (TensorSpec("means", (1, 3), np.dtype(np.float32)),)
        self.runs = 0

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        return [(inputs[0].mean(axis=(1, 2)) * self.weights).astype(np.float32)]

    def close(self) -> None:
        pass


class MeanBackend:
    name = "meanrt"
    label = "the mean runtime"
    rank = 90
    formats = (ModelFormat("meanmodel", "Mean", ".mean", lambda head: head.startswith(MAGIC)),)

    def availability(self, first_only: bool) -> dict[str, RuntimeAvailability]:
        return {"meanrt": RuntimeAvailability("meanrt", True, version="1.0")}

    def preload(self, facts: HardwareFacts) -> list[str]:
        return []

    def compiled_for(self, path: Path) -> str | None:
        return None

    def choose(self, facts: HardwareFacts, accelerator: str, compiled_for: str | None) -> RuntimeChoice:
        if accelerator not in ("auto", "cpu"):
            raise RuntimeChoiceError(f"the mean runtime has no {accelerator}")
        if not facts.runtimes.get("meanrt", RuntimeAvailability("meanrt", False)).available:
            raise RuntimeChoiceError("meanrt was not probed")
        return RuntimeChoice("meanrt", "meanrt", "cpu", reason="meanmodel → meanrt (the only one)")

    def open(self, path: Path, choice: RuntimeChoice, *, threads: int, cache_dir: Path | None, model_sha256: str):
        return MeanSession(path)

    def embedded_labels(self, path: Path) -> tuple[str, ...]:
        return ()


def _brightest(specs, params):
    labels = params.labels or ("red", "green", "blue")

    def decode(outputs, geom):
        means = outputs[0].reshape(-1)
        i = int(means.argmax())
        return [Classification(labels[i], float(means[i]), i)]

    return decode


def serve(broker, cfg, seq: int) -> tuple[Agent, dict, dict]:
    """Run a real agent in this process until its status is online and a prediction has ``seq``; stop it."""
    rec = Recorder(broker, "edge/#")
    agent = Agent(cfg)
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        status = rec.wait_json(f"{cfg.device_id}/status", lambda m: m.get("state") == "online")[0]
        pred = rec.wait_json(f"{cfg.device_id}/predictions", lambda m: m.get("seq", 0) >= seq)[0]
    finally:
        agent.stop()
        runner.join(15)
        rec.close()
    assert not runner.is_alive()
    return agent, status, pred


@pytest.fixture
def registered():
    runtimes.register(MeanBackend())
    tasks.register(Task("brightest-channel", _brightest))
    yield
    runtimes.unregister("meanrt")
    tasks.unregister("brightest-channel")


@pytest.fixture
def mean_model(tmp_path: Path) -> Path:
    path = tmp_path / "weights.bin"  # the format is read from the bytes, never from the name
    path.write_bytes(MAGIC + np.array([1.0, 1.0, 1.0], np.float32).tobytes())
    (tmp_path / "model.yaml").write_text("name: brightest\nversion: '1.0'\ntask: brightest-channel\n"
                                         "labels: [red, green, blue]\npreprocess:\n  std: [1, 1, 1]\n")
    return path


def test_a_registered_backend_and_task_serve_predictions_through_a_real_agent(registered, mean_model, broker,
                                                                             tmp_path):
    cfg = parse_config({
        "device_id": "reg-test", "mqtt": {"url": broker.url},
        "camera": {"source": "synthetic", "fps": 20, "width": 64, "height": 48},
        "model": {"path": str(mean_model)}, "runtime": {"backend": "meanrt", "accelerator": "cpu"},
        "health": {"interval_s": 1}, "state_dir": str(tmp_path / "state"), "log_level": "warning",
    }, environ={})
    agent, status, preds = serve(broker, cfg, seq=5)
    assert status["backend"] == "meanrt" and status["runtime"]["reason"] == "meanmodel → meanrt (the only one)"
    assert status["model"]["format"] == "meanmodel" and status["model"]["task"] == "brightest-channel"
    assert preds["task"] == "brightest-channel" and preds["model"] == {"name": "brightest", "version": "1.0", "format": "meanmodel",
                                                                           "digest": status["model"]["sha256"][:12]}
    [result] = preds["results"]
    assert result["label"] in ("red", "green", "blue") and result["score"] > 0
    assert agent.model.session.runs >= 5 + 2  # the frames above, after open_session's warm-up runs


def test_the_registries_feed_config_the_probe_the_choice_and_the_manifest(registered, mean_model):
    assert runtimes.detect_format(mean_model) == "meanmodel"
    facts = probe("/", check_runtimes="first")
    assert facts.runtimes["meanrt"].available
    assert choose_runtime(facts, "meanmodel").backend == "meanrt"
    with pytest.raises(RuntimeChoiceError, match=r"the TFLite backend cannot run \.meanmodel files"):
        choose_runtime(facts, "meanmodel", backend="tflite")
    cfg = parse_config({"runtime": {"backend": "meanrt"}, "model": {"task": "brightest-channel"}}, environ={})
    assert (cfg.runtime.backend, cfg.model.task) == ("meanrt", "brightest-channel")
    raw = {"deployment_id": "d1", "source": {"type": "url", "url": "file:///m"},
           "model": {"name": "m", "version": "1", "format": "meanmodel", "sha256": "0" * 64, "size": 20,
                     "task": "brightest-channel"}}
    assert parse_manifest(json.dumps(raw).encode())[1].model.format == "meanmodel"


def test_unregistered_names_are_refused_with_the_registered_ones_listed():
    with pytest.raises(ConfigError) as err:
        parse_config({"runtime": {"backend": "meanrt"}, "model": {"task": "brightest-channel"}}, environ={})
    assert "runtime.backend: expected 'auto', 'tflite' or 'onnxruntime', got 'meanrt'" in err.value.problems
    assert any(p.startswith("model.task: expected 'blazeface', 'classification'") for p in err.value.problems)
    raw = {"deployment_id": "d1", "source": {"type": "url", "url": "file:///m"},
           "model": {"name": "m", "version": "1", "format": "meanmodel", "sha256": "0" * 64, "size": 20,
                     "task": "raw"}}
    with pytest.raises(ManifestRejected, match="model.format: Value error, expected 'tflite' or 'onnx'"):
        parse_manifest(json.dumps(raw).encode())


def test_a_taken_name_cannot_be_registered_twice(registered):
    with pytest.raises(ValueError, match="already registered"):
        runtimes.register(MeanBackend())
    with pytest.raises(ValueError, match="already registered"):
        tasks.register(Task("raw", _brightest))
