"""Shared fixtures: a private mosquitto on a free port, the agent as a subprocess, an MQTT recorder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from agent.ctl.bench.broker import LocalBroker as Broker
from agent.ctl.bench.broker import free_port

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models" / "face"

# Where the astronaut's face is in skimage's astronaut.png (512x512): checked by eye, and both
# runtimes find it there; the e2e tests place the photo in a 640x480 frame and expect it back.
ASTRONAUT_FACE = (179, 81, 272, 174)


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


class Recorder:
    """Subscribes to topics and keeps every message (topic, payload, retain) for assertions."""

    def __init__(self, broker: Broker, *topics: str, configure: Callable[[paho.Client], None] | None = None):
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"rec-{uuid.uuid4().hex[:6]}")
        if configure is not None:  # e.g. TLS and credentials, before connecting
            configure(self.client)
        self.topics = topics
        self._subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: [c.subscribe(t, qos=1) for t in self.topics]
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(5), "recorder could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def json(self, suffix: str) -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix)]

    def wait_json(self, suffix: str, pred: Callable[[dict], bool] = lambda m: True, timeout: float = 20,
                  count: int = 1) -> list[dict]:
        def found():
            hits = [m for m in self.json(suffix) if pred(m)]
            return hits if len(hits) >= count else None

        return wait_until(found, timeout, what=f"{count} message(s) on *{suffix}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def recorder_factory() -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(broker: Broker, *topics: str) -> Recorder:
        r = Recorder(broker, *topics)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def choose(fmt: str):
    """The runtime the probe picks on this machine for a model format (the loaders' ``choose``)."""
    from agent.runtimes.choice import choose_runtime, probe

    return choose_runtime(probe(check_runtimes="first"), fmt)


def astronaut() -> np.ndarray:
    import skimage

    img = cv2.imread(str(Path(skimage.__file__).parent / "data" / "astronaut.png"))
    assert img is not None
    return img


@pytest.fixture
def face_frames(tmp_path: Path) -> tuple[Path, tuple[float, float, float, float]]:
    """A folder with one 640x480 frame: the astronaut photo at (100, 0); returns it and the face box, normalised."""
    folder = tmp_path / "frames"
    folder.mkdir()
    canvas = np.full((480, 640, 3), 90, np.uint8)
    canvas[0:480, 100:612] = astronaut()[0:480]
    cv2.imwrite(str(folder / "0001.png"), canvas)
    x1, y1, x2, y2 = ASTRONAUT_FACE
    return folder, ((x1 + 100) / 640, y1 / 480, (x2 + 100) / 640, y2 / 480)


class AgentProcess:
    """The daemon as a user runs it: `python -m agent.daemon --config FILE`, in its own process."""

    def __init__(self, workdir: Path, config: dict, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.config_path = workdir / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "agent.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID", "JOURNAL_STREAM"):
            if env is None or k not in env:
                self.env.pop(k, None)
        self.proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.daemon", "--config", str(self.config_path)],
                                     cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def agent_config(broker: Broker | None, tmp_path: Path, **overrides) -> dict:
    cfg: dict = {
        "device_id": f"test-{uuid.uuid4().hex[:6]}",
        "mqtt": {"url": broker.url if broker else f"mqtt://127.0.0.1:{free_port()}"},
        "camera": {"source": "synthetic", "fps": 15},
        "model": {"path": str(MODELS / "blazeface.tflite")},
        "health": {"interval_s": 1},
        "state_dir": str(tmp_path / "state"),
        "http": {"listen": ""},  # many agents run at once: each web test picks a free port itself
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    made: list[AgentProcess] = []

    def make(config: dict, env: dict[str, str] | None = None, name: str = "agent") -> AgentProcess:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        a = AgentProcess(workdir, config, env)
        made.append(a)
        return a

    yield make
    for a in made:
        a.stop()
