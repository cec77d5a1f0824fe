"""The frame loop: newest frame → model → Inferred, with a model slot that a deploy swaps; then Prediction.

The frame loop only runs the runtime: decoding and numbering (``Pipeline.finish``) happen on the
thread that publishes, so the loop goes straight back to the runtime for the next frame.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.camera import Frame, FrameSlot
from agent.inference.loaded import Inferred, LoadedModel, ModelInfo, Timings
from agent.support.threads import name_this_thread
from agent.vision.results import Result

log = logging.getLogger(__name__)
# Upper bounds (ms) of the inference-time histogram that /metrics exposes (seconds there); cumulated on read.
INFERENCE_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
RECENT_FRAMES = 4  # frames kept so a viewer's picture matches the prediction drawn on it


@dataclass(frozen=True, slots=True)
class Prediction:
    """One processed frame: what the predictions topic carries."""

    seq: int
    boot_id: str
    ts: float
    frame_ts: float
    model: ModelInfo
    task: str
    timings: Timings
    results: list[Result]

    def to_json(self) -> dict:
        return {
            "seq": self.seq,
            "boot_id": self.boot_id,
            "ts": round(self.ts, 6),
            "frame_ts": round(self.frame_ts, 6),
            "model": self.model.brief(),
            "latency_ms": self.timings.to_json(),
            "task": self.task,
            "results": [r.to_json() for r in self.results],
        }


@dataclass
class PipelineStats:
    """Counters the health sampler and probation read; each field has one writer thread."""

    processed: int = 0  # frames through the runtime (frame loop)
    inference_errors: int = 0  # the runtime raised (frame loop)
    output_errors: int = 0  # NaN, infinite or empty outputs, or the decoder raised (the thread that finishes)
    last_error: str | None = None
    last_frame_mono: float = 0.0
    inference_ms: deque = field(default_factory=lambda: deque(maxlen=2048))
    total_ms: deque = field(default_factory=lambda: deque(maxlen=2048))
    # Every frame's inference time since start, by INFERENCE_BUCKETS_MS (the last slot: above them all).
    inference_counts: list[int] = field(default_factory=lambda: [0] * (len(INFERENCE_BUCKETS_MS) + 1))
    inference_sum_ms: float = 0.0
    done_mono: deque = field(default_factory=lambda: deque(maxlen=8192))  # when each frame finished (spin policy)

    @property
    def errors(self) -> int:
        """Frames that gave no prediction: the runtime, its outputs or the decoder failed."""
        return self.inference_errors + self.output_errors

    def failed(self, stage: str, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        n = self.errors
        if n <= 3 or n % 100 == 0:
            log.error("%s failed (%d so far): %s", stage, n, self.last_error)


class Pipeline:
    """Runs the active model on every frame the slot hands over, on its own thread.

    Each frame's raw result goes to ``on_inference``; whoever receives them calls ``finish`` on each,
    in order and on one thread, to get the numbered Prediction.
    """

    def __init__(self, slot: FrameSlot, model: LoadedModel, on_inference: Callable[[Inferred], None],
                 *, boot_id: str | None = None):
        self.slot = slot
        self._model = model
        self.on_inference = on_inference
        self.boot_id = boot_id or uuid.uuid4().hex
        self.stats = PipelineStats()
        self._seq = 0
        self.recent: deque[Frame] = deque(maxlen=RECENT_FRAMES)
        self.latest: Prediction | None = None  # the newest one decoded (set by finish)
        self._aside: deque[_Aside] = deque()
        self._pending: LoadedModel | None = None
        self._swapped = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frame-loop", daemon=True)

    @property
    def model(self) -> LoadedModel:
        return self._model

    @property
    def last_frame(self) -> Frame | None:
        """The newest frame the loop took (the snapshot command, Home Assistant's image)."""
        recent = self.recent
        return recent[-1] if recent else None

    def start(self) -> None:
        self._thread.start()

    def prepare(self, image):
        """Preprocess for the model active now (called on the capture thread)."""
        return self._model.prepare(image)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def wait_first_frame(self, timeout: float) -> bool:
        """True once a frame has been inferred (READY=1 waits for this)."""
        return self._first.wait(timeout)

    def alive(self, within_s: float) -> bool:
        """The loop is turning: it finished a frame, or is idle waiting for one, within ``within_s``."""
        return self._thread.is_alive() and time.monotonic() - self.stats.last_frame_mono < within_s

    def swap(self, new: LoadedModel, timeout: float = 10.0) -> LoadedModel:
        """Make ``new`` active between two frames; returns the old model (the caller closes it)."""
        with self._lock:
            self._swapped.clear()
            self._pending = new
        if not self._swapped.wait(timeout):
            with self._lock:
                if self._pending is new:  # the loop is not turning: swap directly
                    self._pending = None
                    old, self._model = self._model, new
                    return old
        return self._old_after_swap

    def run_aside(self, job: Callable[[LoadedModel], object], timeout: float = 10.0) -> object:
        """Run ``job(active model)`` on the frame loop between two frames and return what it returns.

        For requests (an image posted to the HTTP API) that need the active model: the runtime is
        only ever called from the frame loop, and the live stream's ``seq`` is not touched. Raises
        TimeoutError when the loop does not get to it in time (a hung runtime), or what ``job`` raised.
        """
        aside = _Aside(job)
        self._aside.append(aside)
        self.slot.wake()
        if not aside.done.wait(timeout):
            try:
                self._aside.remove(aside)
            except ValueError:
                pass  # taken just now: its result is dropped
            raise TimeoutError(f"the frame loop did not run the request within {timeout:.0f} s")
        if aside.error is not None:
            raise aside.error
        return aside.value

    def _run_asides(self) -> None:
        while self._aside:
            aside = self._aside.popleft()
            try:
                aside.value = aside.job(self._model)
            except Exception as exc:  # noqa: BLE001 - the caller gets it; the loop goes on
                aside.error = exc
            aside.done.set()

    def _run(self) -> None:
        name_this_thread("ea-frame-loop")
        stats = self.stats
        stats.last_frame_mono = time.monotonic()
        while not self._stop.is_set():
            if self._aside:
                self._run_asides()
            with self._lock:
                if self._pending is not None:
                    self._old_after_swap, self._model = self._model, self._pending
                    self._pending = None
                    log.info("model swapped to %s %s", self._model.info.name, self._model.info.version)
                    self._swapped.set()
            frame = self.slot.take(timeout=0.5)
            if frame is None:
                stats.last_frame_mono = time.monotonic()  # idle is alive; a hung invoke is not
                continue
            self._process(frame)

    def _process(self, frame: Frame) -> None:
        model = self._model
        stats = self.stats
        self.recent.append(frame)
        try:
            done = model.run(frame.image, frame.prepared, hand_off=True)
        except Exception as exc:  # noqa: BLE001 - a bad frame or model must not stop the loop
            stats.inference_errors += 1
            stats.failed("inference", exc)
            stats.last_frame_mono = time.monotonic()
            return
        stats.processed += 1
        stats.inference_ms.append(done.inference_ms)
        stats.inference_counts[bisect.bisect_left(INFERENCE_BUCKETS_MS, done.inference_ms)] += 1
        stats.inference_sum_ms += done.inference_ms
        stats.last_frame_mono = now = time.monotonic()
        stats.done_mono.append(now)
        done.ts = time.time()
        done.frame_ts = frame.ts
        if not self._first.is_set():
            self._first.set()
        try:
            self.on_inference(done)
        except Exception:  # noqa: BLE001
            log.exception("prediction handler failed")

    def finish(self, done: Inferred) -> Prediction | None:
        """Check and decode one frame's outputs into its Prediction, numbered; None when that fails.

        Decoding here, on the publisher's thread, keeps it off the frame loop: at full rate a batch of
        frames is decoded back to back with the decoder's code and data in cache, where on the frame
        loop each decode came right after the runtime had flushed them (MobileNetV2's 1000 classes:
        14 us warm, 80-90 us straight after an inference).
        """
        stats = self.stats
        try:
            results, post_ms = done.model.decode(done)
        except Exception as exc:  # noqa: BLE001 - a bad output or decoder must not stop publishing
            stats.output_errors += 1
            stats.failed("inference", exc)
            return None
        timings = Timings(done.preprocess_ms, done.inference_ms, post_ms)
        stats.total_ms.append(timings.total)
        self._seq += 1
        info = done.model.info
        pred = Prediction(self._seq, self.boot_id, done.ts, done.frame_ts, info, info.task, timings, results)
        self.latest = pred
        return pred

    def frame_of(self, pred: Prediction | None) -> Frame | None:
        """The frame ``pred`` was made from while it is among the recent ones, else the newest frame."""
        for frame in reversed(self.recent):
            if pred is not None and frame.ts == pred.frame_ts:
                return frame
        return self.last_frame


class _Aside:
    __slots__ = ("job", "done", "value", "error")

    def __init__(self, job: Callable[[LoadedModel], object]):
        self.job = job
        self.done = threading.Event()
        self.value: object = None
        self.error: Exception | None = None
