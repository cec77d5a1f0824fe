"""The one session interface every runtime backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


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
