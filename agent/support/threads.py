"""Per-thread OS settings: a name that `top -H`, `ps -L` and py-spy show, and a niceness (Linux)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

_PR_SET_NAME = 15
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # not glibc/musl (macOS, Windows): names stay Python-only
    _libc = None


def name_this_thread(name: str) -> None:
    """Give the calling thread an OS name, e.g. ``ea-capture`` (at most 15 bytes are kept)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def nice_this_thread(nice: int) -> None:
    """Lower the calling thread's CPU priority; Linux sets niceness per thread. No-op where it can't."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):
        pass
