"""Turn raw model outputs into results: classification, SSD and YOLO detection, raw tensor summaries.

Every decoder takes the outputs exactly as the runtime returned them (batch dim 1 included) and the
runtime's output TensorSpecs in the same order, which carry the int8/uint8 quantisation parameters.
"""

from __future__ import annotations

import numpy as np

from agent.runtimes.base import TensorSpec, dequantize
from agent.vision.nms import label_name, nms
from agent.vision.params import DecodeParams
from agent.vision.results import Classification, RawTensor
from agent.vision.ssd import decode_ssd
from agent.vision.yolo import decode_yolo, yolo_layout_of, yolo_meta

__all__ = [
    "DecodeParams",
    "decode_classification",
    "decode_raw",
    "decode_ssd",
    "decode_yolo",
    "nms",
    "yolo_layout_of",
    "yolo_meta",
]

# A float output whose values sum to within this of 1 is already a probability distribution.
_SUM_TOLERANCE = 0.05


def decode_classification(
    outputs: list[np.ndarray], specs: list[TensorSpec], params: DecodeParams
) -> list[Classification]:
    """The top ``params.top_k`` classes scoring at least ``params.threshold``, best first.

    The best class is always returned, even below the threshold. Logits are softmaxed first.
    """
    spec = specs[0] if specs else None
    scores = dequantize(outputs[0], spec) if spec is not None else np.asarray(outputs[0], dtype=np.float32)
    scores = scores.reshape(-1)
    if scores.size == 0:
        return []
    if not _is_distribution(scores, spec):
        scores = _softmax(scores)
    k = min(max(params.top_k, 1), scores.size)
    top = np.argpartition(-scores, k - 1)[:k]
    # lexsort: by score descending, ties by class index, so output order is deterministic.
    top = top[np.lexsort((top, -scores[top]))]
    return [
        Classification(label_name(params.labels, int(i)), float(scores[i]), int(i))
        for n, i in enumerate(top)
        if n == 0 or scores[i] >= params.threshold
    ]


def decode_raw(outputs: list[np.ndarray], specs: list[TensorSpec]) -> list[RawTensor]:
    """One summary per output; ``dtype`` is the tensor's own, the statistics are of its real values."""
    results = []
    for i, out in enumerate(outputs):
        spec = specs[i] if i < len(specs) else None
        real = dequantize(out, spec) if spec is not None else np.asarray(out, dtype=np.float32)
        name = spec.name if spec is not None else f"output_{i}"
        if real.size == 0:
            results.append(RawTensor(name, tuple(out.shape), str(out.dtype), 0.0, 0.0, 0.0, -1))
            continue
        results.append(
            RawTensor(
                name=name,
                shape=tuple(int(d) for d in out.shape),
                dtype=str(out.dtype),
                min=float(real.min()),
                max=float(real.max()),
                mean=float(real.mean(dtype=np.float64)),
                argmax=int(real.argmax()),
            )
        )
    return results


def _is_distribution(scores: np.ndarray, spec: TensorSpec | None) -> bool:
    """Whether scores already are probabilities: all in [0, 1] and summing to about 1."""
    lo, hi = float(scores.min()), float(scores.max())
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        return False
    tolerance = _SUM_TOLERANCE
    if spec is not None and spec.quantized:
        # Each quantised value is off by up to scale/2, so the sum may drift by that much per class.
        tolerance = max(tolerance, scores.size * spec.scale / 2)
    return abs(float(scores.sum(dtype=np.float64)) - 1.0) <= tolerance


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
