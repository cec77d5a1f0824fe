"""sd_notify (READY, WATCHDOG, STATUS, RELOADING, STOPPING) and journald logging, each optional."""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def _builtin_notify(state: str) -> bool:
    """One NOTIFY_SOCKET datagram, never blocking: False when it could not be sent now.

    Not systemd-python's notify: its send blocks while the socket's reader is behind, and the loop
    that pings the watchdog (and a SIGTERM arriving meanwhile) would wait on it.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.send(state.encode(), socket.MSG_DONTWAIT)
        return True
    except OSError as exc:  # BlockingIOError when the reader is behind; gone, refused, interrupted
        log.debug("sd_notify to %s failed: %s", path, exc)
        return False


class Notifier:
    """Talks to systemd when started by it (NOTIFY_SOCKET set); silent otherwise."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.missed = 0  # messages systemd did not take (its reader behind, or the socket gone)
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        # WATCHDOG_PID names the process systemd watches; a child that inherited the env must not ping.
        watched = usec and usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval: float | None = int(usec) / 2e6 if watched else None

    def notify(self, *lines: str) -> bool:
        if not self.enabled:
            return False
        if _builtin_notify("\n".join(lines)):
            return True
        self.missed += 1
        if self.missed == 1 or self.missed % 100 == 0:
            log.warning("sd_notify: systemd did not take %d message(s) (%s); the loop goes on", self.missed,
                        lines[0])
        return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *( [f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd ≥ 253 tell this reload from the next one.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")


def setup_logging(level: str = "info") -> None:
    """journald when running under systemd and systemd-python is present, plain stderr otherwise."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found]

            handler = JournalHandler(SYSLOG_IDENTIFIER="edge-agent")
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler()
        # Under systemd without journal bindings, journald adds its own timestamps.
        fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("INVOCATION_ID") else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
