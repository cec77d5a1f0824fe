"""Getting model bytes onto the device: MQTT chunks or a URL, into a staging file that survives restarts."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """Download failed; the message says why."""


class TransferStopped(TransferError):
    """The caller's stop event was set mid-download (what is on disk is kept, to resume from)."""


class ChunkReceiver:
    """Writes chunks to ``<staging>/<id>.part`` as they come; which ones arrived is kept in ``<id>.have``.

    The .have file is rewritten with os.replace after each chunk, so after a crash it never claims a
    chunk whose bytes were not written first.
    """

    def __init__(self, staging: Path, deployment_id: str, chunks: int, chunk_size: int, size: int,
                 chunk_sha256: list[str] | None = None):
        staging.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.part = staging / f"{deployment_id}.part"
        self._have_path = staging / f"{deployment_id}.have"
        self.chunks, self.chunk_size, self.size = chunks, chunk_size, size
        self.chunk_sha256 = chunk_sha256
        self.rejected = 0  # chunks dropped for not matching their hash
        self._have = bytearray(chunks)
        self._cond = threading.Condition()
        if self.part.exists() and self._have_path.exists():
            saved = self._have_path.read_bytes()
            if len(saved) == chunks:
                self._have[:] = saved
        if not self.part.exists():
            with open(self.part, "wb") as f:
                f.truncate(size)
            os.chmod(self.part, 0o640)
        self._fd = os.open(self.part, os.O_WRONLY)
        self.received = sum(self._have)
        self.resumed = self.received  # chunks already on disk when this transfer (re)started
        self.last_progress = time.monotonic()

    def write(self, index: int, data: bytes) -> bool:
        """Store chunk ``index``; False for a duplicate, an index out of range or a wrongly sized chunk."""
        if not 0 <= index < self.chunks:
            return False
        expected = min(self.chunk_size, self.size - index * self.chunk_size)
        if len(data) != expected:
            log.warning("chunk %d has %d bytes, expected %d; ignored", index, len(data), expected)
            return False
        if self.chunk_sha256 is not None and hashlib.sha256(data).hexdigest() != self.chunk_sha256[index]:
            self.rejected += 1
            log.warning("chunk %d does not match its sha256 in the manifest; dropped (it is asked for again)", index)
            return False
        with self._cond:
            if self._have[index] or self._fd < 0:
                return False
            os.pwrite(self._fd, data, index * self.chunk_size)
            self._have[index] = 1
            self.received += 1
            tmp = self._have_path.with_suffix(".have.tmp")
            tmp.write_bytes(bytes(self._have))
            os.replace(tmp, self._have_path)
            self.last_progress = time.monotonic()
            self._cond.notify_all()
        return True

    def missing(self, limit: int = 1000) -> list[int]:
        with self._cond:
            return [i for i, h in enumerate(self._have) if not h][:limit]

    @property
    def complete(self) -> bool:
        return self.received == self.chunks

    @property
    def progress(self) -> float:
        return self.received / self.chunks

    def wait(self, timeout: float) -> None:
        """Block until a chunk arrives or ``timeout`` passes."""
        with self._cond:
            if not self.complete:
                self._cond.wait(timeout)

    def close(self) -> None:
        with self._cond:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1

    def discard(self) -> None:
        self.close()
        for p in (self.part, self._have_path):
            p.unlink(missing_ok=True)


READ_TIMEOUT_S = 30.0  # one read; the whole download has its own deadline
RETRY_S = (1.0, 2.0, 4.0, 8.0)  # waits between attempts, the last repeated, all within the deadline


def download_url(url: str, dest: Path, size: int, *, progress: Callable[[float], None], deadline: float,
                 stop: threading.Event | None = None, allow_file: bool = False) -> None:
    """Fetch ``url`` into ``dest`` by ``deadline`` (time.monotonic), never more than ``size`` bytes.

    An interrupted download is resumed with an HTTP Range request, again after each failure (with
    backoff) until the deadline; ``file://`` only with ``allow_file`` (deploy.allow_file_urls).
    """
    if url.startswith("file://"):
        _copy_file(url, dest, size, allow_file)
        progress(1.0)
        return
    attempt = 0
    while True:
        try:
            _fetch_http(url, dest, size, progress=progress, deadline=deadline, stop=stop)
            return
        except _Retry as exc:
            wait = RETRY_S[min(attempt, len(RETRY_S) - 1)]
            attempt += 1
            if time.monotonic() + wait >= deadline:
                raise TransferError(f"{url}: {exc} (gave up at the deadline after {attempt} attempts)") from None
            log.info("download %s: %s; retrying in %.0f s", url, exc, wait)
            if stop is not None and stop.wait(wait):
                raise TransferStopped("stopped") from None


class _Retry(Exception):
    """A failure worth another attempt (the server or the network, not the manifest)."""


def _copy_file(url: str, dest: Path, size: int, allow_file: bool) -> None:
    if not allow_file:
        raise TransferError(f"{url}: file:// sources are refused on this device (set deploy.allow_file_urls: true "
                            "to deploy from its own filesystem)")
    src = Path(url[len("file://"):])
    if not src.is_file():
        raise TransferError(f"{url}: no such file")
    if src.stat().st_size != size:
        raise TransferError(f"{url}: {src.stat().st_size} bytes, the manifest says {size}")
    shutil.copyfile(src, dest)


def _fetch_http(url: str, dest: Path, size: int, *, progress: Callable[[float], None], deadline: float,
                stop: threading.Event | None) -> None:
    have = dest.stat().st_size if dest.exists() else 0
    if have > size:
        dest.unlink()
        have = 0
    if have == size:
        progress(1.0)
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TransferError(f"{url}: download timed out with {have} of {size} bytes")
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=min(READ_TIMEOUT_S, remaining))  # noqa: S310 - scheme checked
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
        raise TransferError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _Retry(str(getattr(exc, "reason", exc))) from None
    got = have
    try:
        with resp:
            if have and resp.status != 206:  # the server ignored Range: start again
                got = have = 0
            with open(dest, "ab" if have else "wb") as f:
                # read1: what one recv brings, so a server that trickles cannot hold a read past the deadline
                while chunk := resp.read1(256 * 1024):
                    if stop is not None and stop.is_set():
                        raise TransferStopped("stopped")
                    got += len(chunk)
                    if got > size:
                        raise TransferError(f"{url}: more than the manifest's {size} bytes")
                    f.write(chunk)
                    progress(got / size)
                    if time.monotonic() > deadline:
                        raise TransferError(f"{url}: download timed out with {got} of {size} bytes")
    except OSError as exc:  # a read that timed out, a connection reset: resume from here
        raise _Retry(f"{exc or type(exc).__name__} after {got} of {size} bytes") from None
    if got != size:
        raise _Retry(f"the connection closed after {got} of {size} bytes")
