"""Decoder for TFLite SSD models ending in TFLite_Detection_PostProcess (boxes, classes, scores, count)."""

from __future__ import annotations

import numpy as np

from agent.runtimes.base import TensorSpec, dequantize
from agent.vision.geometry import Geometry
from agent.vision.nms import to_detections
from agent.vision.params import DecodeParams
from agent.vision.registry import Task
from agent.vision.results import Detection


def decode_ssd(
    outputs: list[np.ndarray], specs: list[TensorSpec], geom: Geometry, params: DecodeParams
) -> list[Detection]:
    """Detections above ``params.threshold`` from the four post-process outputs, in either TF1 or TF2 order."""
    real = [_real(out, specs, i) for i, out in enumerate(outputs)]
    names = [specs[i].name.lower() if i < len(specs) else "" for i in range(len(outputs))]
    b, c, s, n = _identify(real, names)
    boxes = real[b].reshape(-1, 4)
    classes = real[c].reshape(-1)
    scores = real[s].reshape(-1)
    count = min(_count(real[n]), boxes.shape[0], classes.size, scores.size)
    # Entries past ``count`` are padding the op leaves uninitialised or zeroed: never read them.
    boxes, classes, scores = boxes[:count], classes[:count], scores[:count]
    keep = np.flatnonzero(scores >= params.threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")][: params.max_detections]
    # The op emits [ymin, xmin, ymax, xmax]; the rest of the agent uses x1y1x2y2.
    xyxy = boxes[keep][:, [1, 0, 3, 2]]
    ids = np.rint(classes[keep]).astype(np.int64)
    return to_detections(xyxy, scores[keep], ids, geom, params.labels)


def _real(array: np.ndarray, specs: list[TensorSpec], i: int) -> np.ndarray:
    return dequantize(array, specs[i]) if i < len(specs) else np.asarray(array, dtype=np.float32)


def _identify(real: list[np.ndarray], names: list[str]) -> tuple[int, int, int, int]:
    """Indices of (boxes, classes, scores, count) among the outputs, found by shape and content."""
    if len(real) < 4:
        raise ValueError(f"SSD post-process needs 4 outputs, got {len(real)}")
    # Boxes: last dim 4 with a per-detection axis; prefer the 3-D (1, N, 4) form so a (1, 4)
    # classes tensor (N == 4) is not mistaken for boxes.
    four = [i for i, a in enumerate(real) if a.ndim >= 2 and a.shape[-1] == 4]
    if not four:
        raise ValueError(f"no boxes output (last dim 4) among shapes {[a.shape for a in real]}")
    b = max(four, key=lambda i: real[i].ndim)
    rest = [i for i in range(len(real)) if i != b]
    # Count: a single value; the lowest-rank one wins so (1,) beats (1, 1) classes when N == 1.
    n = min(rest, key=lambda i: (real[i].size != 1, real[i].ndim))
    first, second = [i for i in rest if i != n][:2]
    return (b, *_classes_then_scores(first, second, _count(real[n]), real, names), n)


def _classes_then_scores(
    first: int, second: int, count: int, real: list[np.ndarray], names: list[str]
) -> tuple[int, int]:
    """Order the two (1, N) outputs as (classes, scores): class ids are whole numbers, scores are not."""
    whole = [_all_whole(real[i].reshape(-1)[:count]) for i in (first, second)]
    if whole[0] != whole[1]:
        return (first, second) if whole[0] else (second, first)
    # Ambiguous (e.g. every score exactly 0 or 1, or no detections): trust names, then TF1 order.
    for i, j in ((first, second), (second, first)):
        if "class" in names[i] or "score" in names[j]:
            return i, j
    return first, second


def _count(array: np.ndarray) -> int:
    """The number of valid detections; a NaN or negative count means none."""
    value = float(array.reshape(-1)[0])
    return int(value) if np.isfinite(value) and value > 0 else 0


def _all_whole(values: np.ndarray) -> bool:
    return bool(np.all(values == np.rint(values)))


TASK = Task("ssd", lambda specs, params: lambda outs, geom: decode_ssd(outs, specs, geom, params))
