"""A runtime that segfaults or hangs must not take the daemon down: the probe's checks and the first load
run in a forked child first, and a backend that crashes there is used in its safe mode, with the reason
in status. The crashes here are real (a NULL read through ctypes: SIGSEGV); if the parent did the work
itself, the test process would die with it."""

from __future__ import annotations

import ctypes
import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS
from test_registries import MeanBackend, MeanSession, _brightest, serve

from agent.config import parse_config
from agent.ctl.local import format_report
from agent.daemon.agent import Agent
from agent.hardware.facts import HardwareFacts, RuntimeAvailability
from agent.inference import loader
from agent.runtimes import registry as runtimes
from agent.runtimes.base import ModelFormat, ModelLoadError, RuntimeChoice
from agent.runtimes.choice import choose_runtime, probe
from agent.runtimes.isolated import ChildCrashed, in_child
from agent.runtimes.tflite import TFLiteSession
from agent.vision import registry as tasks
from agent.vision.registry import Task

MAGIC = b"CRASHMD1"  # same layout as the mean model: the magic, then 3 float32 channel weights


def segfault() -> None:
    ctypes.string_at(0)  # reads address 0: the kernel sends SIGSEGV, as a broken delegate would get


class CrashingBackend(MeanBackend):
    """The mean runtime, with a check and a load that can crash outside its safe mode."""

    name = "crashrt"
    label = "the crashing runtime"
    formats = (ModelFormat("crashmodel", "Crash", ".crash", lambda head: head.startswith(MAGIC)),)
    modules = ("crashrt",)
    safe_mode = "no vector kernels"

    def __init__(self, *, check: str = "ok", load: str = "ok", safe_load: str = "ok"):
        self.check, self.load, self.safe_load = check, load, safe_load

    def availability(self, first_only: bool, safe: bool = False) -> dict[str, RuntimeAvailability]:
        if self.check == "segv" and not safe:
            segfault()
        return {"crashrt": RuntimeAvailability("crashrt", True, version="1.0")}

    def choose(self, facts: HardwareFacts, accelerator: str, compiled_for: str | None) -> RuntimeChoice:
        return RuntimeChoice("crashrt", "crashrt", "vector", reason="crashmodel → crashrt with vector kernels")

    def safe_choice(self, choice: RuntimeChoice) -> RuntimeChoice | None:
        if choice.safe:
            return None
        return dataclasses.replace(choice, accelerator="cpu", safe=True, reason="crashmodel → crashrt, no vector kernels")

    def open(self, path: Path, choice: RuntimeChoice, *, threads: int, cache_dir: Path | None, model_sha256: str):
        how = self.safe_load if choice.safe else self.load
        if how == "segv":
            segfault()
        elif how == "hang":
            time.sleep(3600)
        return MeanSession(path)


@pytest.fixture
def crash_model(tmp_path: Path) -> Path:
    path = tmp_path / "weights.bin"
    path.write_bytes(MAGIC + np.array([1.0, 1.0, 1.0], np.float32).tobytes())
    (tmp_path / "model.yaml").write_text("name: brightest\nversion: '1.0'\ntask: brightest-channel\n"
                                         "labels: [red, green, blue]\npreprocess:\n  std: [1, 1, 1]\n")
    return path


@pytest.fixture
def register():
    tasks.register(Task("brightest-channel", _brightest))
    yield lambda backend: runtimes.register(backend)
    runtimes.unregister("crashrt")
    tasks.unregister("brightest-channel")


def _agent_config(broker, model: Path, tmp_path: Path):
    return parse_config({
        "device_id": "crash-test", "mqtt": {"url": broker.url},
        "camera": {"source": "synthetic", "fps": 20, "width": 64, "height": 48},
        "model": {"path": str(model)}, "runtime": {"backend": "crashrt"},
        "health": {"interval_s": 1}, "state_dir": str(tmp_path / "state"), "log_level": "warning",
    }, environ={})


def _serve(broker, cfg) -> tuple[dict, dict]:
    _, status, pred = serve(broker, cfg, seq=3)
    return status, pred


def test_a_child_reports_a_segfault_a_hang_and_an_exception_and_the_parent_lives_on():
    with pytest.raises(ChildCrashed, match=r"the check crashed its process \(killed by SIGSEGV\)"):
        in_child(segfault, timeout=10, what="the check")
    t0 = time.monotonic()
    with pytest.raises(ChildCrashed, match="did not finish within 1 s"):
        in_child(lambda: time.sleep(60), timeout=1, what="the check")
    assert time.monotonic() - t0 < 5
    with pytest.raises(ZeroDivisionError):
        in_child(lambda: 1 / 0, timeout=10, what="the check")
    assert in_child(lambda: {"answer": 42}, timeout=10, what="the check") == {"answer": 42}


def test_a_backend_whose_probe_check_segfaults_serves_in_safe_mode_with_the_reason_in_status(
        register, crash_model, broker, tmp_path):
    register(CrashingBackend(check="segv"))
    checked = probe(check_runtimes="first").runtimes["crashrt"]
    assert checked.available and "the crashing runtime's check crashed its process (killed by SIGSEGV)" in checked.fallback
    assert "it works with no vector kernels" in checked.fallback
    status, pred = _serve(broker, _agent_config(broker, crash_model, tmp_path))
    reason = status["runtime"]["reason"]
    assert reason.startswith("crashmodel → crashrt, no vector kernels (") and "killed by SIGSEGV" in reason
    assert pred["results"][0]["label"] in ("red", "green", "blue")


def test_a_model_whose_first_load_segfaults_is_loaded_in_safe_mode(register, crash_model, broker, tmp_path):
    register(CrashingBackend(load="segv"))
    status, pred = _serve(broker, _agent_config(broker, crash_model, tmp_path))
    assert status["runtime"]["reason"] == ("crashmodel → crashrt, no vector kernels (loading weights.bin crashed its "
                                           "process (killed by SIGSEGV) on vector)")
    assert pred["results"]


def test_a_first_load_that_hangs_is_given_up_on_and_loaded_in_safe_mode(register, crash_model, broker, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(loader, "TRIAL_TIMEOUT_S", 2.0)
    register(CrashingBackend(load="hang"))
    status, _ = _serve(broker, _agent_config(broker, crash_model, tmp_path))
    assert "loading weights.bin did not finish within 2 s; the child was killed on vector" in status["runtime"]["reason"]


def test_a_load_that_crashes_in_safe_mode_too_is_one_clear_error_not_a_dead_process(register, crash_model, broker,
                                                                                    tmp_path):
    register(CrashingBackend(load="segv", safe_load="segv"))
    with pytest.raises(ModelLoadError) as err:
        Agent(_agent_config(broker, crash_model, tmp_path))
    assert str(err.value) == (f"{crash_model}: loading weights.bin crashed its process (killed by SIGSEGV); loading "
                              "weights.bin with no vector kernels crashed its process (killed by SIGSEGV)")


# -- the real TFLite safe mode -------------------------------------------------------------------

def test_tflite_safe_mode_runs_the_real_model_without_xnnpack_and_agrees_with_it():
    rng = np.random.default_rng(0)
    x = rng.random((1, 128, 128, 3), np.float32) * 2 - 1
    fast, safe = TFLiteSession(MODELS / "blazeface.tflite"), TFLiteSession(MODELS / "blazeface.tflite",
                                                                                 xnnpack=False)
    assert fast.info.accelerator == "xnnpack" and safe.info.accelerator == "cpu" and safe.info.notes == ("XNNPACK off",)
    for a, b in zip(fast.run([x]), safe.run([x]), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3)


def test_a_tflite_runtime_that_works_only_without_xnnpack_is_chosen_so():
    facts = probe(check_runtimes="first")
    module = next(n for n, r in facts.runtimes.items() if r.available and n != "onnxruntime")
    crashed = dataclasses.replace(facts.runtimes[module], fallback="the TFLite backend's check crashed its process "
                                  "(killed by SIGSEGV); it works with XNNPACK off")
    facts = dataclasses.replace(facts, runtimes={**facts.runtimes, module: crashed})
    assert f"ok {crashed.version}, safe mode only ({crashed.fallback})" in format_report(facts)  # agent-ctl probe
    choice = choose_runtime(facts, "tflite")
    assert choice.safe and choice.accelerator == "cpu"
    assert choice.reason == f"tflite model → {module} on CPU, XNNPACK off ({crashed.fallback})"
    session = runtimes.backend("tflite").open(MODELS / "blazeface.tflite", choice, threads=1, cache_dir=None,
                                              model_sha256="")
    assert session.info.accelerator == "cpu"
