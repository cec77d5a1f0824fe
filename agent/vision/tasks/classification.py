"""Classification: the top-k classes of a score vector (probabilities, or logits softmaxed first)."""

from __future__ import annotations

import numpy as np

from agent.runtimes.base import TensorSpec, dequantize
from agent.vision.nms import label_name
from agent.vision.params import DecodeParams
from agent.vision.registry import Task
from agent.vision.results import Classification

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


TASK = Task("classification", lambda specs, params: lambda outs, geom: decode_classification(outs, specs, params))
