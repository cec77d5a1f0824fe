"""A model ready to serve: its session, preprocessor and task decoder, and the records a frame leaves behind."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from agent.runtimes.base import RuntimeChoice, Session
from agent.support import memory
from agent.vision.geometry import Geometry
from agent.vision.preprocess import Preprocessor
from agent.vision.registry import Decoder
from agent.vision.results import Result


@dataclass(frozen=True)
class ModelInfo:
    """What status and every prediction say about the model that made it."""

    name: str
    version: str
    sha256: str
    format: str
    task: str
    path: str

    def brief(self) -> dict:
        """Enough to tell two builds of one model apart (the bundled .tflite and .onnx share name and
        version): the format and the first 12 hex digits of the file's sha256."""
        return {"name": self.name, "version": self.version, "format": self.format, "digest": self.sha256[:12]}

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "format": self.format,
                "task": self.task}


@dataclass(frozen=True, slots=True)
class Prepared:
    """A frame already turned into ``model``'s input tensor (on the capture thread, ahead of inference)."""

    model: LoadedModel
    tensor: np.ndarray
    geom: Geometry
    ms: float


# Outputs up to this size are copied and decoded off the frame loop; larger ones (YOLO at 640: 2.7 MB)
# are decoded on it, so frames waiting for the publisher never hold hundreds of megabytes.
HAND_OFF_MAX_BYTES = 256 * 1024


@dataclass(slots=True, eq=False)
class Inferred:
    """One frame through the runtime, not yet decoded: what the frame loop hands on."""

    model: LoadedModel
    outputs: list[np.ndarray]
    geom: Geometry
    preprocess_ms: float
    inference_ms: float
    results: list[Result] | None = None  # set when decoded on the frame loop (outputs too large to hand on)
    postprocess_ms: float = 0.0
    ts: float = 0.0  # when inference finished (Unix seconds)
    frame_ts: float = 0.0  # when the frame was captured


@dataclass
class Timings:
    preprocess: float
    inference: float
    postprocess: float

    @property
    def total(self) -> float:
        return self.preprocess + self.inference + self.postprocess

    def to_json(self) -> dict:
        return {"preprocess": round(self.preprocess, 3), "inference": round(self.inference, 3),
                "postprocess": round(self.postprocess, 3), "total": round(self.total, 3)}


class LoadedModel:
    """One model, loaded and warmed, that turns a frame into results."""

    def __init__(self, info: ModelInfo, session: Session, preprocessor: Preprocessor, decoder: Decoder,
                 choice: RuntimeChoice | None = None):
        self.info = info
        self.session = session
        self.preprocessor = preprocessor
        self.decoder = decoder
        self.choice = choice  # what the probe picked and why (status reports the reason)
        # Write straight into the TFLite interpreter's input buffer when it offers one.
        self._input_view = getattr(session, "input_view", None) if len(session.inputs) == 1 else None
        self._reuses_outputs = session.reuses_outputs  # part of the Session protocol: no silent default

    def run_raw(self, frame: np.ndarray) -> tuple[list[np.ndarray], Geometry]:
        """Preprocess and run, returning the raw outputs (for validation and golden data)."""
        tensor, geom = self.preprocessor(frame)
        return [np.array(o) for o in self.session.run([tensor])], geom

    def prepare(self, frame: np.ndarray) -> Prepared:
        """Preprocess into a pooled buffer; ``infer(frame, prepared)`` then runs it and gives the buffer back."""
        t0 = time.perf_counter()
        buf = self.preprocessor.pool.get()
        geom = self.preprocessor(frame, buf)[1]
        return Prepared(self, buf, geom, (time.perf_counter() - t0) * 1e3)

    def release(self, prepared: Prepared) -> None:
        self.preprocessor.pool.put(prepared.tensor)

    def run(self, frame: np.ndarray, prepared: Prepared | None = None, *, hand_off: bool = False) -> Inferred:
        """Preprocess (unless ``prepared``) and run the runtime; ``decode`` then checks and decodes the outputs.

        With ``hand_off`` the outputs are the caller's to keep while the runtime goes on to the next
        frame (copied out of buffers the runtime reuses), so another thread can decode them; outputs
        over ``HAND_OFF_MAX_BYTES`` are decoded here instead (``results`` is then set).
        """
        t0 = time.perf_counter()
        pre_ms = None
        if prepared is not None and prepared.model is not self:  # made for the model before a swap
            if self.preprocessor.feeds_like(prepared.model.preprocessor):
                # A new version with the same input (the usual deploy): the tensor is this model's too,
                # so the first frames after a swap are not preprocessed again on the frame loop.
                prepared = Prepared(self, prepared.tensor, prepared.geom, prepared.ms)
            else:
                prepared.model.release(prepared)
                prepared = None
        if prepared is not None:
            geom, pre_ms = prepared.geom, prepared.ms
            t1 = time.perf_counter()
            try:
                outputs = self.session.run([prepared.tensor])
            finally:
                self.release(prepared)
        elif self._input_view is not None:
            view = self._input_view(0)
            geom = self.preprocessor(frame, view)[1]
            del view  # TFLite refuses to invoke while a view of its buffers is alive
            t1 = time.perf_counter()
            outputs = self.session.run(None)  # type: ignore[arg-type]
        else:
            tensor, geom = self.preprocessor(frame)
            t1 = time.perf_counter()
            outputs = self.session.run([tensor])
        t2 = time.perf_counter()
        done = Inferred(self, outputs, geom, pre_ms if pre_ms is not None else (t1 - t0) * 1e3, (t2 - t1) * 1e3)
        if hand_off:
            if sum(out.nbytes for out in outputs) > HAND_OFF_MAX_BYTES:
                done.results, done.postprocess_ms = self.decode(done)
            elif self._reuses_outputs:
                done.outputs = [out.copy() for out in outputs]
        return done

    def decode(self, done: Inferred) -> tuple[list[Result], float]:
        """Check one run's outputs and decode them: the results and the milliseconds it took.

        Raises FloatingPointError for NaN, infinite or empty outputs: a model that produces them
        counts as failing (probation rolls it back).
        """
        if done.results is not None:
            return done.results, done.postprocess_ms
        t0 = time.perf_counter()
        for out in done.outputs:
            # isfinite().all() measured fastest: 4.5 us on BlazeFace's outputs, vs 7-11 us for min + max
            # or a float64 sum.
            if out.size == 0 or (out.dtype.kind == "f" and not np.isfinite(out).all()):
                raise FloatingPointError("model output has NaN/infinite values or is empty")
        results = self.decoder(done.outputs, done.geom)
        return results, (time.perf_counter() - t0) * 1e3

    def infer(self, frame: np.ndarray, prepared: Prepared | None = None) -> tuple[list[Result], Timings]:
        """Preprocess, run and decode one frame, all on the calling thread."""
        done = self.run(frame, prepared)
        results, post_ms = self.decode(done)
        return results, Timings(done.preprocess_ms, done.inference_ms, post_ms)

    def close(self) -> None:
        self.session.close()
        memory.give_back()
