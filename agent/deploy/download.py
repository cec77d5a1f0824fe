"""The downloading state: transfer's chunk receiver or URL download driven to the end, with progress events
and requests for missing chunks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.deploy.events import DeployEvent
from agent.deploy.manifest import DeploymentManifest, MqttSource
from agent.deploy.transfer import ChunkReceiver, TransferError, TransferStopped, download_url

log = logging.getLogger(__name__)
NEED_AFTER_S = 1.0  # ask for missing chunks when nothing came for this long
REPORT_EVERY_S = 0.5


class Interrupted(Exception):
    """The agent is stopping mid-deployment: not an outcome, so not journaled; it resumes after restart."""


# report(event, record): publish an event; record=True also journals its state.
Report = Callable[[DeployEvent, bool], None]


def download(m: DeploymentManifest, staging: Path, *, receivers: dict[str, ChunkReceiver], report: Report,
             stop: threading.Event, abort: threading.Event, timeout_s: float, allow_file: bool = False) -> Path:
    """The staged file, complete (not yet verified). ``abort`` means superseded, ``stop`` the agent stopping."""
    did = m.deployment_id
    report(DeployEvent(did, "downloading", progress=0.0), True)
    if isinstance(m.source, MqttSource):
        return _chunks(m, staging, receivers=receivers, report=report, stop=stop, abort=abort, timeout_s=timeout_s)
    dest = staging / f"{did}.part"
    staging.mkdir(parents=True, exist_ok=True)
    last = [0.0]

    def progress(p: float) -> None:
        if time.monotonic() - last[0] > REPORT_EVERY_S or p >= 1.0:
            last[0] = time.monotonic()
            report(DeployEvent(did, "downloading", progress=round(p, 4)), False)

    try:
        download_url(m.source.url, dest, m.model.size, progress=progress, stop=abort,
                     deadline=time.monotonic() + timeout_s, allow_file=allow_file)
    except TransferStopped:
        if stop.is_set():
            raise Interrupted from None
        raise TransferError("superseded by a newer deployment") from None
    return dest


def _chunks(m: DeploymentManifest, staging: Path, *, receivers: dict[str, ChunkReceiver], report: Report,
            stop: threading.Event, abort: threading.Event, timeout_s: float) -> Path:
    did, source = m.deployment_id, m.source
    assert isinstance(source, MqttSource)
    r = ChunkReceiver(staging, did, source.chunks, source.chunk_size, m.model.size, source.chunk_sha256)
    receivers[did] = r
    if r.resumed:
        log.info("deployment %s: resuming with %d of %d chunks on disk", did, r.resumed, r.chunks)
    deadline = time.monotonic() + timeout_s
    last_report = last_need = 0.0
    while not r.complete:
        if stop.is_set():
            raise Interrupted
        if abort.is_set():
            raise TransferError("superseded by a newer deployment")
        now = time.monotonic()
        if now > deadline:
            raise TransferError(f"download timed out after {timeout_s:g} s with {r.received} of {r.chunks} chunks")
        # Ask for what is missing when nothing came for a while (chunks lost, sender restarted, late joiner).
        if now - r.last_progress > NEED_AFTER_S and now - last_need > NEED_AFTER_S:
            report(DeployEvent(did, "downloading", progress=r.progress, need=r.missing(500)), False)
            last_need = now
        elif now - last_report > REPORT_EVERY_S:
            report(DeployEvent(did, "downloading", progress=r.progress), False)
            last_report = now
        r.wait(0.2)
    r.close()
    report(DeployEvent(did, "downloading", progress=1.0), False)
    return r.part
