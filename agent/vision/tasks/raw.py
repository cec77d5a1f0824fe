"""Raw: no decoding, a summary of each output tensor (shape, dtype, min, max, mean, argmax)."""

from __future__ import annotations

import numpy as np

from agent.runtimes.base import TensorSpec, dequantize
from agent.vision.registry import Task
from agent.vision.results import RawTensor


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


TASK = Task("raw", lambda specs, params: lambda outs, geom: decode_raw(outs, specs))
