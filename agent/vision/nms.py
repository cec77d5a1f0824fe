"""Non-maximum suppression and the box-to-Detection step shared by the SSD and YOLO decoders."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.vision.geometry import Geometry
from agent.vision.results import Detection


def label_name(labels: Sequence[str], index: int) -> str:
    """The label for a class index, or the index as text when the label file has no such entry."""
    return labels[index] if 0 <= index < len(labels) else str(index)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_out: int) -> np.ndarray:
    """Greedy NMS over x1y1x2y2 ``boxes``: indices of the kept boxes, highest score first.

    A box is suppressed when its IoU with an already kept box is strictly above ``iou_threshold``.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if boxes.shape[0] == 0 or max_out <= 0:
        return np.empty(0, dtype=np.intp)
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    # Stable sort so equal scores keep their input order, which makes results reproducible.
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    # The loop runs once per *kept* box (at most max_out); each pass is vectorised over the rest.
    while order.size and len(keep) < max_out:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0.0)
        ih = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0.0)
        inter = iw * ih
        union = areas[i] + areas[rest] - inter
        iou = inter / np.maximum(union, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, max_out: int
) -> np.ndarray:
    """Per-class NMS: boxes of different classes never suppress each other."""
    if boxes.shape[0] == 0:
        return np.empty(0, dtype=np.intp)
    # Shift each class into its own disjoint region so one NMS pass cannot mix classes.
    span = float(boxes.max() - boxes.min()) + 1.0
    offsets = classes.astype(np.float32)[:, None] * span
    return nms(boxes + offsets, scores, iou_threshold, max_out)


def to_detections(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, geom: Geometry, labels: Sequence[str]
) -> list[Detection]:
    """Detections from x1y1x2y2 boxes normalised to the model input, mapped back to the frame.

    Boxes that end up with no area in the frame (e.g. entirely inside letterbox padding) are dropped.
    """
    out: list[Detection] = []
    for box, score, cls in zip(boxes.tolist(), scores.tolist(), classes.tolist(), strict=True):
        fx1, fy1, fx2, fy2 = geom.box_to_frame(*box)
        if fx2 <= fx1 or fy2 <= fy1:
            continue
        index = int(cls)
        out.append(Detection(label_name(labels, index), float(score), (fx1, fy1, fx2, fy2), index))
    return out
