"""Run one runtime check in a forked child: a runtime or delegate that segfaults kills the child, not us.

The probe's interpreter checks and the daemon's first model load go through here (deployments are
validated in a child already, agent.deploy.validate). A fork, not a new interpreter: the child has
everything the parent imported, and what the child imports (a runtime the daemon may not serve with)
goes away with it.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
SIGNAL_NAMES = {s.value: s.name for s in signal.Signals}


class ChildCrashed(RuntimeError):
    """The check killed its process (a signal) or hung past its time; the message says which."""


def in_child(fn: Callable[[], T], *, timeout: float, what: str) -> T:
    """``fn()`` in a forked child: its result, its exception re-raised here, or ChildCrashed.

    A bare fork (not multiprocessing): it works from a daemonic process too, such as a validation child.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the parent's code
        code = 0
        try:
            os.close(read_fd)
            try:
                reply = ("ok", fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it there
                reply = ("error", exc)
            try:
                data = pickle.dumps(reply)
            except Exception:  # noqa: BLE001 - an exception that does not pickle still says what it was
                data = pickle.dumps(("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))
            with os.fdopen(write_fd, "wb") as out:
                out.write(data)
        except BaseException:  # noqa: BLE001
            code = 70
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise ChildCrashed(f"{what} did not finish within {timeout:.0f} s; the child was killed")
            chunk = pipe.read(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) or not chunks:
        how = (f"killed by {SIGNAL_NAMES.get(os.WTERMSIG(status), os.WTERMSIG(status))}" if os.WIFSIGNALED(status)
               else f"exit code {os.waitstatus_to_exitcode(status)}")
        raise ChildCrashed(f"{what} crashed its process ({how})")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "error":
        raise value
    return value
