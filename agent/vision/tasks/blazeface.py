"""MediaPipe BlazeFace decoding: SSD anchors, sigmoid scores, weighted non-maximum suppression."""

from __future__ import annotations

from functools import cache

import numpy as np

from agent.runtimes.base import TensorSpec, dequantize
from agent.vision.geometry import Geometry
from agent.vision.params import DecodeParams
from agent.vision.registry import Task
from agent.vision.results import Detection

KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_center", "right_ear_tragion", "left_ear_tragion")


@cache
def anchors(input_size: int = 128, strides: tuple[int, ...] = (8, 16, 16, 16)) -> np.ndarray:
    """Anchor centres (N, 2) as MediaPipe's SsdAnchorsCalculator makes them for face detection.

    Layers with the same stride share one grid; each layer adds two anchors per cell
    (aspect ratio 1 plus the interpolated scale), and the face models use fixed anchor size.
    """
    out = []
    i = 0
    while i < len(strides):
        stride = strides[i]
        per_cell = 0
        while i < len(strides) and strides[i] == stride:
            per_cell += 2
            i += 1
        n = int(np.ceil(input_size / stride))
        ys, xs = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        out.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(out).astype(np.float32)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou_threshold: float,
                 max_out: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's WEIGHTED suppression: overlapping candidates are averaged by score, not discarded."""
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    remaining = np.ones(len(scores), bool)
    kept = []
    for i in range(len(scores)):
        if not remaining[i]:
            continue
        overlap = remaining & (_iou(boxes[i], boxes) > iou_threshold)
        overlap[i] = True
        w = scores[overlap][:, None]
        box = (boxes[overlap] * w).sum(0) / w.sum()
        kps = (keypoints[overlap] * w[:, :, None]).sum(0) / w.sum()
        kept.append((box, kps, float(scores[i])))
        remaining &= ~overlap
        if len(kept) >= max_out:
            break
    return kept


def decode_blazeface(outputs: list[np.ndarray], specs: list[TensorSpec], geom: Geometry, *,
                     labels: tuple[str, ...] = ("face",), threshold: float = 0.5, iou_threshold: float = 0.3,
                     max_detections: int = 100) -> list[Detection]:
    """Faces with boxes and six keypoints, normalised to the original frame."""
    reg_i = next((i for i, o in enumerate(outputs) if o.shape[-1] == 16), None)
    cls_i = next((i for i, o in enumerate(outputs) if o.shape[-1] == 1 and o.ndim >= 2), None)
    if reg_i is None or cls_i is None:
        shapes = [o.shape for o in outputs]
        raise ValueError(f"BlazeFace expects outputs (1,N,16) and (1,N,1); the model gives {shapes}")
    raw_boxes = dequantize(outputs[reg_i], specs[reg_i]).reshape(-1, 16)
    raw_scores = dequantize(outputs[cls_i], specs[cls_i]).reshape(-1)
    size = geom.dst_w
    anc = anchors(size, (8, 16, 16, 16) if len(raw_scores) == 896 else (16, 32, 32, 32))
    if len(anc) != len(raw_scores):
        raise ValueError(f"BlazeFace model has {len(raw_scores)} anchors; expected {len(anc)} for a {size}px input")
    # Score threshold first so the decode below touches only a handful of candidates.
    logit_min = np.log(threshold / (1 - threshold)) if 0 < threshold < 1 else -np.inf
    idx = np.nonzero(raw_scores >= logit_min)[0]
    if idx.size == 0:
        return []
    scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores[idx], -100, 100)))
    r = raw_boxes[idx] / size
    a = anc[idx]
    cx, cy = r[:, 0] + a[:, 0], r[:, 1] + a[:, 1]
    half_w, half_h = r[:, 2] / 2, r[:, 3] / 2
    boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    kps = r[:, 4:16].reshape(-1, 6, 2) + a[:, None, :]
    label = labels[0] if labels else "face"
    out = []
    for box, kp, score in weighted_nms(boxes, kps, scores, iou_threshold, max_detections):
        out.append(Detection(
            label=label,
            score=score,
            box=geom.box_to_frame(*(float(v) for v in box)),
            index=0,
            keypoints=tuple(geom.point_to_frame(float(x), float(y)) for x, y in kp),
        ))
    return out


def _bind(specs: list[TensorSpec], params: DecodeParams):
    return lambda outs, geom: decode_blazeface(outs, specs, geom, labels=params.labels, threshold=params.threshold,
                                               iou_threshold=params.iou_threshold,
                                               max_detections=params.max_detections)


TASK = Task("blazeface", _bind)  # no labels: every box is a "face"
