"""Decoder for Ultralytics YOLO ONNX exports (YOLOv5, YOLOv8 and YOLO11 heads) and their metadata."""

from __future__ import annotations

import ast

import numpy as np

from agent.runtimes.base import TensorSpec, dequantize
from agent.vision.geometry import Geometry
from agent.vision.nms import batched_nms, to_detections
from agent.vision.params import DecodeParams
from agent.vision.registry import Task
from agent.vision.results import Detection

# Same cap as Ultralytics' max_nms: bounds NMS time when a low threshold lets everything through.
_MAX_NMS_CANDIDATES = 30_000
# Coordinates all at or below this are taken as already normalised to the model input.
_NORMALISED_LIMIT = 1.5
# Metadata values longer than this are not parsed: names for even 10k classes fit easily.
_MAX_META_CHARS = 200_000
_MAX_CLASSES = 100_000


def decode_yolo(
    outputs: list[np.ndarray], specs: list[TensorSpec], geom: Geometry, params: DecodeParams
) -> list[Detection]:
    """Detections from a YOLO head: threshold, per-class NMS, then mapped back to the frame."""
    i = _pick_output(outputs)
    raw = dequantize(outputs[i], specs[i]) if i < len(specs) else np.asarray(outputs[i], np.float32)
    layout, rows = _rows(_as_matrix(raw), len(params.labels), params.yolo_layout)
    if layout == "v5":
        cxcywh, scores, classes = _candidates_v5(rows, params.threshold)
    else:
        cxcywh, scores, classes = _candidates_v8(rows, params.threshold)
    if scores.size == 0:
        return []
    boxes = _xyxy_normalised(cxcywh, geom)
    keep = batched_nms(boxes, scores, classes, params.iou_threshold, params.max_detections)
    return to_detections(boxes[keep], scores[keep], classes[keep], geom, params.labels)


def yolo_layout_of(shape: tuple[int, ...], num_labels: int = 0, layout: str = "auto") -> tuple[str, bool]:
    """(layout, transposed) for an output shape: which head it is and whether channels come first.

    Heuristic, in order: ``layout`` if not "auto"; with known labels, last dim == 5 + nc means v5 and
    either dim == 4 + nc means v8; otherwise channels-first (1, C, N) with C < N means v8 (how
    Ultralytics exports v8/YOLO11), and channels-last (1, N, C) means v5 (how YOLOv5 exports),
    except C == 84, which is the transposed 80-class COCO v8 head.
    """
    if layout not in ("auto", "v5", "v8"):
        raise ValueError(f"yolo_layout must be auto, v5 or v8, not {layout!r}")
    a, b = shape[-2], shape[-1]
    nl = num_labels
    if layout == "auto":
        if nl and b == 5 + nl:
            layout = "v5"
        elif nl and 4 + nl in (a, b):
            layout = "v8"
        elif nl and a == 5 + nl:
            layout = "v5"
        elif a < b:
            layout = "v8"
        else:
            layout = "v8" if b == 84 else "v5"
    head = 5 if layout == "v5" else 4
    if nl and b == head + nl:
        return layout, False
    if nl and a == head + nl:
        return layout, True
    # Unknown class count: candidates outnumber channels in every real export.
    return layout, a < b


def yolo_meta(metadata: dict[str, str]) -> tuple[tuple[str, ...] | None, tuple[int, int] | None]:
    """Class names and input (h, w) from Ultralytics ONNX metadata; None for each that is absent or bad."""
    return _names(_literal(metadata.get("names"))), _imgsz(_literal(metadata.get("imgsz")))


def _pick_output(outputs: list[np.ndarray]) -> int:
    """The detection head: the first output that is a matrix once the batch dim is dropped.

    Segmentation exports add a 4-D mask-prototype output, which this skips.
    """
    for i, out in enumerate(outputs):
        if sum(d != 1 for d in out.shape[:-2]) == 0 and out.ndim >= 2:
            return i
    raise ValueError(f"no YOLO head among output shapes {[o.shape for o in outputs]}")


def _as_matrix(array: np.ndarray) -> np.ndarray:
    return array.reshape(array.shape[-2], array.shape[-1])


def _rows(matrix: np.ndarray, num_labels: int, layout: str) -> tuple[str, np.ndarray]:
    """The layout and a (N, C) view with one candidate per row."""
    layout, transposed = yolo_layout_of(matrix.shape, num_labels, layout)
    rows = matrix.T if transposed else matrix
    if rows.shape[1] < 5:
        raise ValueError(f"YOLO {layout} output needs at least 5 channels, got shape {matrix.shape}")
    return layout, rows


def _candidates_v8(rows: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cxcywh, score, class) of rows whose best class score passes: v8 class scores are final."""
    cls = rows[:, 4:]
    best = cls.max(axis=1)
    cand = _top(np.flatnonzero(best >= threshold), best)
    return rows[cand, :4], best[cand], cls[cand].argmax(axis=1)


def _candidates_v5(rows: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cxcywh, score, class) with score = objectness * class score."""
    obj = rows[:, 4]
    # Class scores are sigmoids (<= 1), so objectness alone bounds the final score: cheap pre-filter.
    cand = np.flatnonzero(obj >= threshold)
    if rows.shape[1] == 5:  # single-class export without a class column
        scores, classes = obj[cand], np.zeros(cand.size, dtype=np.int64)
    else:
        cls = rows[cand, 5:] * obj[cand, None]
        classes = cls.argmax(axis=1)
        scores = cls[np.arange(cand.size), classes]
    passed = scores >= threshold
    cand, scores, classes = cand[passed], scores[passed], classes[passed]
    top = _top(np.arange(cand.size), scores)
    return rows[cand[top], :4], scores[top], classes[top]


def _top(cand: np.ndarray, scores: np.ndarray) -> np.ndarray:
    if cand.size <= _MAX_NMS_CANDIDATES:
        return cand
    return cand[np.argpartition(-scores[cand], _MAX_NMS_CANDIDATES - 1)[:_MAX_NMS_CANDIDATES]]


def _xyxy_normalised(cxcywh: np.ndarray, geom: Geometry) -> np.ndarray:
    """Centre boxes in model-input pixels (or already normalised) -> x1y1x2y2 normalised to the input."""
    cx, cy, w, h = cxcywh.astype(np.float32, copy=False).T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    if np.abs(cxcywh).max() > _NORMALISED_LIMIT:
        boxes /= np.array([geom.dst_w, geom.dst_h, geom.dst_w, geom.dst_h], dtype=np.float32)
    return boxes


def _literal(text: object) -> object:
    """A Python literal parsed without evaluating code; None if it is not one."""
    if not isinstance(text, str) or len(text) > _MAX_META_CHARS:
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _names(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    if not isinstance(value, dict) or not value:
        return None
    if not all(type(k) is int and 0 <= k < _MAX_CLASSES and isinstance(v, str) for k, v in value.items()):
        return None
    # Gaps in the ids get their number as the name, like any missing label.
    return tuple(value.get(i, str(i)) for i in range(max(value) + 1))


def _imgsz(value: object) -> tuple[int, int] | None:
    if type(value) is int and value > 0:
        return value, value
    if isinstance(value, list | tuple) and len(value) in (1, 2):
        if all(type(v) is int and v > 0 for v in value):
            return int(value[0]), int(value[-1])
    return None


# Ultralytics exports carry their class names and input size in the file's metadata.
TASK = Task("yolo", lambda specs, params: lambda outs, geom: decode_yolo(outs, specs, geom, params), hints=yolo_meta)
