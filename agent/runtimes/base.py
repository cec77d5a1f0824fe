"""What every runtime backend implements: a Session per loaded model, and the Backend that makes them."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.hardware.facts import HardwareFacts, RuntimeAvailability


class RuntimeUnavailable(RuntimeError):
    """The requested runtime or accelerator cannot be used on this machine."""


class ModelLoadError(RuntimeError):
    """The model file could not be loaded by the runtime."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and element type of one model input or output.

    ``scale``/``zero_point`` are the affine quantisation parameters of an int8/uint8
    tensor (real = scale * (q - zero_point)); ``scale == 0`` means not quantised.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer)


@dataclass(frozen=True)
class SessionInfo:
    """What really runs: reported in status so a user sees fallbacks."""

    backend: str  # "tflite" | "onnxruntime"
    accelerator: str  # "cpu" | "xnnpack" | "edgetpu" | "cuda" | "tensorrt"
    module: str  # e.g. "ai_edge_litert", "onnxruntime 1.31.1"
    providers: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)  # e.g. "CUDA failed to load; running on CPU"


class Session(Protocol):
    """A loaded model ready to infer. ``run`` takes inputs in the model's own layout and dtype."""

    info: SessionInfo
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: dict[str, str]
    reuses_outputs: bool  # run() writes into the same output arrays every time (keep a copy to keep them)

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


def dequantize(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Real values of a (possibly quantised) output tensor as float32."""
    if spec.quantized and np.issubdtype(array.dtype, np.integer):
        return (array.astype(np.float32) - spec.zero_point) * spec.scale
    return array.astype(np.float32, copy=False)


# -- what a backend declares ---------------------------------------------------------------------

class RuntimeChoiceError(ValueError):
    """The requested backend/accelerator cannot run this model here; the message says how to fix it."""


@dataclass(frozen=True)
class RuntimeChoice:
    """Which backend, module and accelerator to load a model with, and why."""

    backend: str  # a registered backend's name: "tflite" | "onnxruntime" | ...
    module: str  # e.g. "ai_edge_litert", "onnxruntime"
    accelerator: str  # "cpu" | "xnnpack" | "edgetpu" | "cuda" | "tensorrt"
    providers: tuple[str, ...] = ()
    reason: str = ""
    safe: bool = False  # the backend's safe mode (TFLite: XNNPACK off; onnxruntime: the CPU provider only)
    spin: bool = False  # let the thread pool spin-wait between runs (onnxruntime; runtime.spin)


@dataclass(frozen=True)
class ModelFormat:
    """A model file format: its name in manifests and model.yaml, and how to tell it from its first bytes."""

    name: str  # "tflite", "onnx"
    title: str  # "TFLite", in messages
    suffix: str  # ".tflite"
    sniff: Callable[[bytes], bool]  # the file's first 16 bytes -> is it this format?


class Backend(Protocol):
    """One inference runtime: what it runs, whether it works here, how it picks an accelerator, how it loads.

    A backend is one module in agent/runtimes/ that defines ``BACKEND``; the registry finds it.
    """

    name: str  # runtime.backend's value and status's "backend"
    label: str  # how messages name it, e.g. "the TFLite backend"
    formats: tuple[ModelFormat, ...]
    rank: int  # lower comes first: in the probe's report, and as auto's pick when two run one format

    def availability(self, first_only: bool) -> dict[str, RuntimeAvailability]:
        """Which of its modules import and work here (``first_only``: stop at the first that does)."""
        ...

    def preload(self, facts: HardwareFacts) -> list[str]:
        """Modules the validation forkserver imports once (only ones that work here)."""
        ...

    def compiled_for(self, path: Path) -> str | None:
        """The accelerator a model file was compiled for (it then runs nowhere else), or None."""
        ...

    def choose(self, facts: HardwareFacts, accelerator: str, compiled_for: str | None) -> RuntimeChoice:
        """The module and accelerator for one of its formats; RuntimeChoiceError with a fix when impossible."""
        ...

    def open(self, path: Path, choice: RuntimeChoice, *, threads: int, cache_dir: Path | None,
             model_sha256: str) -> Session:
        """Load the model (no warm-up: open_session does that for every backend)."""
        ...

    def embedded_labels(self, path: Path) -> tuple[str, ...]:
        """Labels packed inside the model file, if its format carries them."""
        ...


class SafeModeBackend(Backend, Protocol):
    """A backend with a safer way to run when its usual one crashes the process (optional).

    The probe checks such a backend again in safe mode when its check crashed its child, and the
    daemon's first load falls back to ``safe_choice`` when loading crashed its trial child.
    """

    modules: tuple[str, ...]  # what its availability() reports, so a crashed check can say which
    safe_mode: str  # e.g. "XNNPACK off"

    def availability(self, first_only: bool, safe: bool = False) -> dict[str, RuntimeAvailability]: ...

    def safe_choice(self, choice: RuntimeChoice) -> RuntimeChoice | None:
        """``choice`` in safe mode (``safe=True``, its own reason), or None when there is none."""
        ...


# -- availability checks -------------------------------------------------------------------------

def error_text(exc: BaseException) -> str:
    """One line for why a runtime module does not work, with the numpy-ABI case spelled out."""
    # A C extension that fails inside reports SystemError; the real reason is the chained exception.
    while isinstance(exc, SystemError) and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}"[:300]
    if "_ARRAY_API" in text or "numpy.core.multiarray failed" in text:
        text += f" (built for numpy 1.x, this is numpy {np.__version__}: it needs numpy<2)"
    return text


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence fd 2 during a check: a numpy-1 extension under numpy 2 prints a page of C-level noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
