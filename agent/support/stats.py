"""Percentiles of latency samples, the one way health, probation and the bench compute them."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def percentile(values: Iterable[float], p: float) -> float:
    """The ``p``-th percentile of ``values`` (numpy's linear interpolation); 0.0 when there are none."""
    arr = np.fromiter(values, dtype=np.float64)
    return float(np.percentile(arr, p)) if arr.size else 0.0


def percentiles(values: Iterable[float], ps: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": …, "p95": …, "p99": …}`` rounded to microseconds of a millisecond (3 decimals)."""
    arr = np.fromiter(values, dtype=np.float64)
    if not arr.size:
        return {f"p{p}": 0.0 for p in ps}
    return {f"p{p}": round(float(v), 3) for p, v in zip(ps, np.percentile(arr, ps), strict=True)}
