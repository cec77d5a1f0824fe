"""Probation: after a swap the new model must serve without errors and without getting much slower.

``verdict`` is a pure function of the counters, so every rule is tested without a running model.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.inference.loaded import LoadedModel
from agent.support.stats import percentile

MIN_FRAMES = 30  # latency is judged only after this many frames on the new model
MIN_EXTRA_MS = 5.0  # ... and only a p95 this much over the old one counts
MAX_ERRORS = 3


@dataclass
class Probation:
    """The model that was swapped in, the one it replaced (kept loaded for an instant swap back), and the
    counters at the swap."""

    deployment_id: str
    until: float  # monotonic time at which it has passed
    previous: LoadedModel
    baseline_p95: float  # the old model's inference p95 before the swap; 0.0 when it had run no frame
    processed_at_swap: int
    errors_at_swap: int


def verdict(p: Probation, *, processed: int, errors: int, inference_ms: list[float],
            last_error: str | None) -> str | None:
    """Why the new model must be rolled back, or None while it behaves."""
    new_errors = errors - p.errors_at_swap
    n_new = processed - p.processed_at_swap
    if new_errors >= MAX_ERRORS:
        return f"{new_errors} inference errors during probation (last: {last_error})"
    if p.baseline_p95 and n_new >= MIN_FRAMES:
        p95 = percentile(inference_ms[-min(n_new, len(inference_ms)):], 95)
        # 3x, and a few ms more: on a loaded machine a 2 ms model can briefly read 6 ms.
        if p95 and p95 > 3 * p.baseline_p95 and p95 > p.baseline_p95 + MIN_EXTRA_MS:
            return f"inference p95 {p95:.1f} ms is over 3x the previous model's {p.baseline_p95:.1f} ms"
    return None
