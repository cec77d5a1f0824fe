"""A bound on the server's connections, and on how long one may take to send its request's headers.

aiohttp keeps a connection that sends half a request open for as long as the client likes, and
its token check runs only once the headers are in: 1100 such connections from anyone who could
reach the port used up the daemon's file descriptors (1024 by default) and took the whole agent
down. Here each connection goes through ``Limited``, a protocol that passes everything to
aiohttp's own and: refuses connections beyond ``max_open``; closes one whose first request has
not reached a handler within ``header_timeout_s``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

MAX_OPEN = 64
HEADER_TIMEOUT_S = 5.0


class Connections:
    def __init__(self, max_open: int = MAX_OPEN, header_timeout_s: float = HEADER_TIMEOUT_S):
        self.max_open = max_open
        self.header_timeout_s = header_timeout_s
        self.open = 0
        self.refused = 0
        self.timed_out = 0
        self._started: set[asyncio.BaseTransport] = set()

    def started(self, transport: asyncio.BaseTransport | None) -> None:
        """A request on ``transport`` reached the application: its connection is no longer on the clock."""
        if transport is not None:
            self._started.add(transport)

    def is_started(self, transport: asyncio.BaseTransport) -> bool:
        return transport in self._started

    def closed(self, transport: asyncio.BaseTransport | None) -> None:
        self._started.discard(transport)  # type: ignore[arg-type]

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: Limited(self, inner)


class Limited(asyncio.Protocol):
    def __init__(self, conns: Connections, inner: Callable[[], asyncio.Protocol]):
        self._conns = conns
        self._make = inner
        self._inner: asyncio.Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        conns = self._conns
        if conns.open >= conns.max_open:
            conns.refused += 1
            transport.abort()
            return
        conns.open += 1
        self._transport = transport
        self._inner = self._make()
        self._timer = asyncio.get_running_loop().call_later(conns.header_timeout_s, self._deadline)
        self._inner.connection_made(transport)

    def _deadline(self) -> None:
        if self._transport is not None and not self._conns.is_started(self._transport):
            self._conns.timed_out += 1
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._conns.open -= 1
        self._conns.closed(self._transport)
        self._inner.connection_lost(exc)
        self._inner = None
