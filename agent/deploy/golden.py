"""Golden outputs: a small frame and samples of what the model gave on it where the deployment was made.

The device runs the same frame through the same model in its validation child and compares the
samples within a tolerance before the model may serve.
"""

from __future__ import annotations

import base64
from pathlib import Path

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.inference.loader import load_model
from agent.runtimes.base import dequantize
from agent.runtimes.choice import chooser, probe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GoldenOutput(_Strict):
    index: int = Field(ge=0)
    shape: list[int]
    stride: int = Field(gt=0)
    values: list[float] = Field(max_length=1024)
    mean: float
    std: float


class Golden(_Strict):
    """A small frame and samples of the raw outputs it gave where the deployment was made."""

    frame_png: str = Field(max_length=96 * 1024)  # base64
    outputs: list[GoldenOutput]
    atol: float = Field(1e-3, ge=0)
    rtol: float = Field(1e-2, ge=0)
    max_mismatch: float = Field(0.01, ge=0, le=1, description="fraction of samples allowed outside tolerance")


def golden_frame() -> np.ndarray:
    """A deterministic 160x120 test card: gradients and blocks, so every model gets a varied input."""
    x = np.linspace(0, 255, 160, dtype=np.float32)
    y = np.linspace(0, 255, 120, dtype=np.float32)[:, None]
    img = np.stack([np.broadcast_to(x, (120, 160)), np.broadcast_to(y, (120, 160)),
                    np.broadcast_to((x[None, :] + y) / 2, (120, 160))], axis=2).astype(np.uint8)
    img[30:90, 50:110] = (40, 200, 90)
    return img


def make_golden(model_path: Path, task: str) -> Golden:
    """Run the model locally on the test card; the device must reproduce these outputs."""
    model = load_model(model_path, chooser(probe(check_runtimes="first"), model_path), task=task)
    frame = golden_frame()
    outputs, _ = model.run_raw(frame)
    real = [dequantize(o, s) for o, s in zip(outputs, model.session.outputs, strict=True)]
    model.close()
    ok, png = cv2.imencode(".png", frame)
    if not ok:
        raise RuntimeError("OpenCV could not encode the golden frame as PNG")
    return Golden(frame_png=base64.b64encode(png.tobytes()).decode(),
                  outputs=[sample_output(i, o) for i, o in enumerate(real)])


def sample_output(index: int, arr: np.ndarray, n: int = 256) -> GoldenOutput:
    flat = np.asarray(arr, np.float64).ravel()
    stride = max(1, flat.size // n)
    values = flat[::stride][:n]
    return GoldenOutput(index=index, shape=list(arr.shape), stride=stride, values=[float(v) for v in values],
                        mean=float(flat.mean()) if flat.size else 0.0, std=float(flat.std()) if flat.size else 0.0)


def compare_golden(golden: Golden, outputs: list[np.ndarray]) -> str | None:
    """None when the outputs match the golden samples within tolerance, else what differs."""
    if len(outputs) <= max((g.index for g in golden.outputs), default=-1):
        return f"the model has {len(outputs)} outputs; the golden data has more"
    for g in golden.outputs:
        arr = np.asarray(outputs[g.index], np.float64)
        if list(arr.shape) != g.shape:
            return f"output {g.index} has shape {list(arr.shape)}, expected {g.shape}"
        got = arr.ravel()[:: g.stride][: len(g.values)]
        exp = np.asarray(g.values)
        if not np.isfinite(got).all():
            return f"output {g.index} has NaN or infinite values on the golden frame"
        bad = np.abs(got - exp) > golden.atol + golden.rtol * np.abs(exp)
        if bad.mean() > golden.max_mismatch:
            worst = float(np.abs(got - exp).max())
            return (f"output {g.index} differs from the golden output on {int(bad.sum())} of {bad.size} samples "
                    f"(largest difference {worst:.4g})")
    return None
