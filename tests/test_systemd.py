"""sd_notify over a real NOTIFY_SOCKET: READY after the first frame, WATCHDOG, STATUS, RELOADING, STOPPING."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import agent_config, wait_until

from agent.daemon.systemd import Notifier, _builtin_notify


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.received.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return self.received

    def has(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for msg in self.drain() for line in msg.splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path):
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def test_builtin_sender_reaches_a_real_socket(notify_socket, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    assert _builtin_notify("READY=1\nSTATUS=hello")
    assert notify_socket.drain() == ["READY=1\nSTATUS=hello"]


def test_builtin_sender_supports_abstract_sockets(monkeypatch):
    name = f"edge-agent-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert _builtin_notify("WATCHDOG=1")
        assert s.recv(100) == b"WATCHDOG=1"
    finally:
        s.close()


def test_notifier_is_silent_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and n.ready() is False and n.watchdog_interval is None


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_the_watched_pid(monkeypatch, notify_socket):
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Notifier().watchdog_interval is None


def test_daemon_speaks_the_notify_protocol_through_its_life(notify_socket, broker, agent_factory, tmp_path):
    cfg = agent_config(broker, tmp_path)
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "2000000"}
    agent = agent_factory(cfg, env=env).start()
    wait_until(lambda: notify_socket.has("READY=1"), 30, what="READY=1")
    ready = next(m for m in notify_socket.received if "READY=1" in m)
    assert "STATUS=model blazeface-short-range" in ready
    wait_until(lambda: sum("WATCHDOG=1" in m for m in notify_socket.drain()) >= 2, 10, what="watchdog pings")
    wait_until(lambda: notify_socket.has("STATUS=") and any("fps" in m for m in notify_socket.received), 10,
               what="a STATUS line with fps")
    agent.signal(signal.SIGHUP)
    wait_until(lambda: notify_socket.has("RELOADING=1"), 10, what="RELOADING=1")
    reload_at = max(i for i, m in enumerate(notify_socket.received) if "RELOADING=1" in m)
    wait_until(lambda: any("READY=1" in m for m in notify_socket.drain()[reload_at:]), 10, what="READY after reload")
    t0 = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert time.monotonic() - t0 < 5
    assert notify_socket.has("STOPPING=1")


def _fill(sock_path: Path) -> None:
    """Send to a reader that never reads until its queue is full (the state a stalled systemd leaves)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(str(sock_path))
        s.setblocking(False)
        try:
            while True:
                s.send(b"X" * 1024)
        except BlockingIOError:
            pass


def test_notify_never_blocks_when_systemds_reader_is_behind(notify_socket, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    _fill(notify_socket.path)
    n = Notifier()
    t0 = time.monotonic()
    assert n.watchdog() is False and n.status("still here") is False
    assert time.monotonic() - t0 < 0.5
    assert n.missed == 2


def test_a_notify_socket_that_stops_reading_stops_neither_frames_nor_sigterm(notify_socket, broker,
                                                                             recorder_factory, agent_factory,
                                                                             tmp_path):
    cfg = agent_config(broker, tmp_path)
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/#")
    _fill(notify_socket.path)  # full before the agent's first READY, and never read again
    agent = agent_factory(cfg, env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"}).start()
    rec.wait_json("/predictions", count=30, timeout=30)  # 2 s of frames at 15 fps, with pings due every 0.2 s
    health = rec.wait_json("/health", lambda h: h.get("notify_missed", 0) > 0)[-1]
    assert health["frames_processed"] > 0
    t0 = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0 and time.monotonic() - t0 < 5
    assert rec.wait_json("/status", lambda s: s["state"] == "offline")
    assert "Traceback" not in agent.log(), agent.log()[-2000:]
