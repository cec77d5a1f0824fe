"""Opening a model on the backend the probe chose, warming it up, and how many threads it gets."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from agent.runtimes import registry
from agent.runtimes.base import ModelLoadError, RuntimeChoice, Session
from agent.support.threads import name_this_thread

log = logging.getLogger(__name__)
WARMUP_RUNS = 2


def inference_threads(configured: int = 0, cores: int | None = None) -> int:
    """``runtime.threads``; 0 picks the split between inference and the rest of the pipeline.

    With 4 or more usable cores (a Pi 4/5, a Jetson) one is left to capture, preprocessing and MQTT,
    which otherwise preempt a runtime worker and stall the whole parallel invoke; with 2 or 3 every
    core goes to inference, since leaving one would idle a third to half of the machine between frames.
    ``cores`` defaults to the CPUs this process may run on (a cpuset or CPUAffinity= counts).
    """
    if configured:
        return configured
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
    return cores - 1 if cores >= 4 else max(cores, 1)


def warm_up(session: Session, runs: int) -> None:
    """Run ``session`` on zeros ``runs`` times, from a thread that yields every core to the rest of the process.

    A fresh session's first runs still grow arenas and wake thread pools (ORT MobileNetV2: 3x then
    1.4x the steady time), and that must happen here, not on the first frames after a hot swap. But
    during a hot swap the live model is using the cores: warm-up runs at normal priority slowed its
    frames to about half speed for their duration. Under SCHED_IDLE the calling thread (which does
    the sequential parts and hands out the parallel ones) runs only on a core nothing else wants,
    and a live thread that wakes takes the core back at once; the thread ends with the warm-up, so
    nothing after it inherits the policy. Where SCHED_IDLE is missing the runs happen all the same.
    """
    zeros = [np.zeros(tuple(max(d, 1) for d in s.shape), s.dtype) for s in session.inputs]
    failed: list[BaseException] = []

    def work() -> None:
        name_this_thread("ea-warm-up")
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            pass
        try:
            for _ in range(runs):
                session.run(zeros)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            failed.append(exc)

    t = threading.Thread(target=work, name="ea-warm-up", daemon=True)
    t.start()
    t.join()
    if failed:
        raise failed[0]


def open_session(path: str | Path, choice: RuntimeChoice, *, threads: int = 0, cache_dir: Path | None = None,
                 model_sha256: str = "", warmup: bool = True) -> Session:
    """Load ``path`` on the backend the probe chose, then warm it up (``warm_up``, WARMUP_RUNS runs on zeros)."""
    t0 = time.perf_counter()
    session = registry.backend(choice.backend).open(Path(path), choice, threads=threads, cache_dir=cache_dir,
                                                    model_sha256=model_sha256)
    if warmup:
        try:
            warm_up(session, WARMUP_RUNS)
        except Exception as exc:  # noqa: BLE001 - any runtime error here means the model can't serve
            session.close()
            raise ModelLoadError(f"{path}: warm-up inference failed ({exc})") from exc
    log.info("loaded %s on %s/%s in %.0f ms", Path(path).name, session.info.backend,
             session.info.accelerator, (time.perf_counter() - t0) * 1000)
    return session
