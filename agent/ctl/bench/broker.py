"""A private mosquitto for the bench, the scripts in scripts/ and the tests: a free port of 127.0.0.1,
started and stopped (and started again) at will."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """A mosquitto of our own on a port of our own, its config and log in ``workdir``.

    ``persist`` keeps retained messages and sessions across a stop and start, as a real broker's
    restart does; ``extra_conf`` is appended to the generated mosquitto.conf.
    """

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "", persist: bool = False):
        self.persist = persist
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.workdir = workdir
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> LocalBroker:
        if not Path(MOSQUITTO).exists():
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        store = self.workdir / f"mosquitto-{self.port}-db"
        store.mkdir(exist_ok=True)
        persistence = (f"persistence true\npersistence_location {store}/\nautosave_interval 1\n"
                       if self.persist else "persistence false\n")
        user = "user root\n" if os.geteuid() == 0 else ""  # as root mosquitto drops to a user that can't read tmp
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\n{persistence}{user}"
                        f"{self.extra_conf}")
        log = open(self.workdir / f"mosquitto-{self.port}.log", "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not self._listening():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not listen on port {self.port} within 10 s; see {self.workdir}")
            time.sleep(0.05)
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; see {self.workdir}")
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex((self.host, self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
