"""Frame sources, and the capture thread that keeps only the newest frame."""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from agent.config import BUNDLE_ROOT, CameraConfig
from agent.support.redact import redact_url
from agent.support.threads import name_this_thread

log = logging.getLogger(__name__)

DEMO_CLIP = BUNDLE_ROOT / "assets" / "demo.mp4"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class SourceError(RuntimeError):
    """A source that cannot be opened; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Frame:
    image: np.ndarray  # H, W, 3 BGR uint8
    ts: float  # wall-clock capture time (time.time())
    mono: float  # time.monotonic() at capture, for latency
    index: int  # capture counter since start
    prepared: Any = None  # the model's input tensor, made on this thread ahead of inference


class FrameSource(Protocol):
    """Something that yields BGR frames. ``live`` sources pace themselves (cameras, streams)."""

    name: str
    live: bool

    def open(self) -> None: ...

    def read(self) -> np.ndarray | None:
        """The next frame, or None when there is none (end of file, a hiccup)."""

    def skip(self) -> bool:
        """Drop one frame without decoding it (live sources); False when nothing came."""

    def close(self) -> None: ...


class CvSource:
    """OpenCV VideoCapture: V4L2 devices, RTSP/HTTP streams, video files, GStreamer pipelines."""

    def __init__(self, target: str | int, *, live: bool, loop: bool = False, api: int = cv2.CAP_ANY,
                 width: int = 0, height: int = 0, name: str | None = None):
        self.target, self.live, self.loop, self.api = target, live, loop, api
        self.width, self.height = width, height
        self.name = name or str(target)
        self._cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        cap = cv2.VideoCapture(self.target, self.api)
        if not cap.isOpened():
            raise SourceError(f"cannot open camera source {self.name}")
        if self.live and isinstance(self.target, int | str) and str(self.target).startswith(("/dev/video", "0", "1")):
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of stale ones
        self._cap = cap

    def read(self) -> np.ndarray | None:
        if self._cap is None:
            return None
        ok, img = self._cap.read()
        if not ok and self.loop and not self.live:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, img = self._cap.read()
        return img if ok else None

    def skip(self) -> bool:
        return bool(self._cap is not None and self._cap.grab())

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class ImageFolderSource:
    """images:DIR — every image in a folder, in name order."""

    live = False

    def __init__(self, folder: str, loop: bool = True):
        self.folder, self.loop = Path(folder), loop
        self.name = f"images:{folder}"
        self._files: list[Path] = []
        self._i = 0

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"image folder not found: {self.folder}")
        self._files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._files:
            raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.folder}")
        self._i = 0

    def read(self) -> np.ndarray | None:
        if self._i >= len(self._files):
            if not self.loop:
                return None
            self._i = 0
        path = self._files[self._i]
        self._i += 1
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            log.warning("skipping unreadable image %s", path)
        return img

    def skip(self) -> bool:
        return False

    def close(self) -> None:
        self._files = []


class SyntheticSource:
    """A moving test pattern at any rate: no camera, no files, deterministic."""

    live = False
    name = "synthetic"

    def __init__(self, width: int = 640, height: int = 480):
        self.width, self.height = width, height
        self._n = 0
        x = np.linspace(0, 255, width, dtype=np.float32)
        y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
        self._base = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                               np.full((height, width), 128, np.float32)], axis=2).astype(np.uint8)

    def open(self) -> None:
        self._n = 0

    def read(self) -> np.ndarray | None:
        img = self._base.copy()
        n = self._n
        self._n += 1
        side = self.height // 4
        x = (n * 7) % max(self.width - side, 1)
        y = (n * 3) % max(self.height - side, 1)
        # cv2 fills the square without holding the GIL (a numpy slice assignment holds it 3x longer)
        cv2.rectangle(img, (x, y), (x + side - 1, y + side - 1), (255 - (n * 5) % 256, (n * 11) % 256, 255), -1)
        return img

    def skip(self) -> bool:
        return False

    def close(self) -> None:
        pass


class Picamera2Source:
    """The Raspberry Pi CSI camera through picamera2 (present on Raspberry Pi OS)."""

    live = True
    name = "picamera2"

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self._cam = None

    def open(self) -> None:
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ImportError as exc:
            raise SourceError("camera.source is picamera2 but the picamera2 module does not import "
                              "(on Raspberry Pi OS: apt install python3-picamera2, and create the venv "
                              "with --system-site-packages)") from exc
        cam = Picamera2()
        cam.configure(cam.create_video_configuration(main={"size": (self.width, self.height), "format": "BGR888"}))
        cam.start()
        self._cam = cam

    def read(self) -> np.ndarray | None:
        return None if self._cam is None else self._cam.capture_array()

    def skip(self) -> bool:
        return False

    def close(self) -> None:
        if self._cam is not None:
            self._cam.close()
            self._cam = None


def first_video_device(dev_root: str = "/dev") -> str | None:
    devices = sorted(glob.glob(os.path.join(dev_root, "video*")), key=lambda p: (len(p), p))
    return devices[0] if devices else None


def make_source(cfg: CameraConfig, *, base: Path | None = None) -> FrameSource:
    """The FrameSource for ``camera.source``; ``auto`` = first /dev/video*, else the bundled demo clip."""
    src = cfg.source.strip()
    if src == "auto":
        dev = first_video_device()
        if dev:
            return CvSource(dev, live=True, api=cv2.CAP_V4L2, width=cfg.width, height=cfg.height)
        return CvSource(str(DEMO_CLIP), live=False, loop=True, name=f"demo clip {DEMO_CLIP.name}")
    if src == "synthetic":
        return SyntheticSource(cfg.width, cfg.height)
    if src == "picamera2":
        return Picamera2Source(cfg.width, cfg.height)
    if src.startswith("images:"):
        folder = Path(src[len("images:"):]).expanduser()
        if not folder.is_absolute() and base is not None:
            folder = base / folder
        return ImageFolderSource(str(folder), loop=cfg.loop)
    if src.startswith("gst:"):
        return CvSource(src[len("gst:"):], live=True, api=cv2.CAP_GSTREAMER, name="gstreamer pipeline")
    if src.isdigit():
        return CvSource(int(src), live=True, api=cv2.CAP_V4L2, width=cfg.width, height=cfg.height, name=f"/dev/video{src}")
    if src.startswith("/dev/video"):
        return CvSource(src, live=True, api=cv2.CAP_V4L2, width=cfg.width, height=cfg.height)
    if "://" in src:
        scheme = src.split("://", 1)[0].lower()
        if scheme == "file":
            return CvSource(src[len("file://"):], live=False, loop=cfg.loop)
        return CvSource(src, live=True, api=cv2.CAP_FFMPEG, name=redact_url(src))
    path = Path(src).expanduser()
    if not path.is_absolute() and base is not None and (base / path).exists():
        path = base / path
    return CvSource(str(path), live=False, loop=cfg.loop)


class FrameSlot:
    """Holds the newest frame: a slow consumer skips frames instead of queueing them.

    Sources we pace ourselves (files, test patterns) may ``queue`` up to ``depth`` frames instead,
    so the capture thread has slack to prepare the next ones while inference runs.
    """

    def __init__(self, depth: int = 2) -> None:
        self._cond = threading.Condition()
        self._frames: deque[Frame] = deque()
        self.depth = depth
        self.dropped = 0
        self.takes = 0  # frames asked for by the consumer
        self.waits = 0  # ... of which it had to wait for

    def put(self, frame: Frame) -> Frame | None:
        """Offer the newest frame (live sources); returns the unprocessed one it replaced, if any."""
        with self._cond:
            old = self._frames.pop() if self._frames else None
            if old is not None:
                self.dropped += 1
            self._frames.clear()
            self._frames.append(frame)
            self._cond.notify()
            return old

    def queue(self, frame: Frame) -> None:
        """Add a frame behind the others (paced sources: only called when ``wait_room`` said so)."""
        with self._cond:
            self._frames.append(frame)
            self._cond.notify()

    def wake(self) -> None:
        """Return a consumer waiting in ``take`` now, frame or not (it has other work)."""
        with self._cond:
            self._cond.notify_all()

    def take(self, timeout: float) -> Frame | None:
        with self._cond:
            self.takes += 1
            if not self._frames:
                self.waits += 1  # the consumer is ahead of the camera (spin policy: camera-bound)
                self._cond.wait(timeout)
            frame = self._frames.popleft() if self._frames else None
            self._cond.notify_all()  # a producer may be waiting for room
            return frame

    def wait_room(self, timeout: float) -> bool:
        """Block until there is room for one more queued frame."""
        with self._cond:
            if len(self._frames) >= self.depth:
                self._cond.wait(timeout)
            return len(self._frames) < self.depth


class Capture:
    """The capture thread: reads the source, paces to ``fps``, reopens a stalled source with backoff."""

    def __init__(self, source: FrameSource, slot: FrameSlot, *, fps: float, stall_s: float):
        self.source, self.slot = source, slot
        self.fps, self.stall_s = fps, stall_s
        self.state = "starting"  # starting | streaming | stalled | reconnecting | ended
        self.captured = 0
        self.reopens = 0
        self.last_error: str | None = None
        # Set by the pipeline: preprocess each frame here, overlapped with inference of the previous one.
        self.prepare: Callable[[np.ndarray], Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.source.close()

    def _open(self) -> bool:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self.source.open()
                log.info("camera: %s open", self.source.name)
                return True
            except Exception as exc:  # noqa: BLE001 - any failure to open is retried with backoff
                self.last_error = str(exc)
                self.state = "reconnecting"
                log.warning("camera: %s; retrying in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        return False

    def _run(self) -> None:
        name_this_thread("ea-capture")
        if not self._open():
            return
        period = 1.0 / self.fps if self.fps > 0 else 0.0
        next_due = time.monotonic()
        last_frame = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if period and now < next_due:
                # Live sources are drained while we wait, so the frame we keep is fresh, not buffered;
                # a file or test pattern just sleeps until its frame is due.
                if not self.source.live:
                    self._stop.wait(next_due - now)
                elif not self.source.skip():
                    self._stop.wait(min(next_due - now, 0.05))
                continue
            paced_by_consumer = not self.source.live and not period
            if paced_by_consumer and not self.slot.wait_room(0.1):
                # A file or test pattern with no fps cap goes at the consumer's pace: a frame or two
                # ahead, none made only to be dropped (that would take CPU from inference).
                continue
            img = self.source.read()
            if img is None:
                if not self.source.live and not getattr(self.source, "loop", True):
                    self.state = "ended"  # a file or folder played once, as configured
                    self._stop.wait(0.1)
                    continue
                if now - last_frame > self.stall_s:
                    self._reopen()
                    last_frame = time.monotonic()
                else:
                    self._stop.wait(0.01)
                continue
            t = time.monotonic()
            last_frame = t
            self.state = "streaming"
            prepared = None
            if self.prepare is not None:
                try:
                    prepared = self.prepare(img)
                except Exception as exc:  # noqa: BLE001 - the frame loop will preprocess it and report
                    log.debug("preparing a frame failed: %s", exc)
            frame = Frame(img, time.time(), t, self.captured, prepared)
            if paced_by_consumer:
                self.slot.queue(frame)
            else:
                dropped = self.slot.put(frame)
                if dropped is not None and dropped.prepared is not None:
                    dropped.prepared.model.release(dropped.prepared)
            self.captured += 1
            if period:
                next_due += period
                if next_due < t:  # late (a stall): start the beat again instead of sending a burst
                    next_due = t + period

    def _reopen(self) -> None:
        self.state = "stalled"
        self.reopens += 1
        log.warning("camera: no frame from %s for %.1f s; reopening", self.source.name, self.stall_s)
        self.source.close()
        self._open()
