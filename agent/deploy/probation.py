"""Probation: after a swap the new model must serve real frames, without errors and without getting much
slower, before the deployment is committed.

``verdict`` is a pure function of the counters, so every rule is tested without a running model.
A probation in progress is kept on disk, so a restart (kill -9 included) resumes it instead of
skipping it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from agent.inference.loaded import LoadedModel
from agent.support.stats import percentile

log = logging.getLogger(__name__)
MIN_FRAMES_FOR_LATENCY = 30  # latency is judged only after this many frames on the new model
MIN_EXTRA_MS = 5.0  # ... and only a p95 this much over the allowance counts
MAX_ERRORS = 3
RESUME_AT_LEAST_S = 10.0  # after a restart a probation gets at least this long again


@dataclass(frozen=True)
class Terms:
    """What a model must show in probation: for how long, how many frames at least, how much slower at most."""

    seconds: float
    min_frames: int
    latency_factor: float  # its inference p95 may be up to this many times the previous model's


def terms_for(asked, deploy, camera_fps: float = 0.0) -> Terms:
    """A manifest's probation section (agent-ctl deploy --probation-s …) over the device's deploy.* config.

    The minimum of frames is capped at half of what the camera's fps cap can bring in the time (a
    5 fps camera brings 5 frames in a 1 s probation): a model that hangs serves none at all.
    """
    def pick(name: str, default):
        value = getattr(asked, name, None) if asked is not None else None
        return default if value is None else value

    seconds = pick("seconds", deploy.probation_s)
    min_frames = pick("min_frames", deploy.probation_min_frames)
    if camera_fps > 0:
        min_frames = min(min_frames, max(1, int(camera_fps * seconds / 2)))
    return Terms(seconds=seconds, min_frames=min_frames,
                 latency_factor=pick("latency_factor", deploy.probation_latency_factor))


@dataclass
class Probation:
    """The model that was swapped in, the one it replaced (kept loaded for an instant swap back; None
    after a restart, then it is loaded from the store), and the counters at the swap."""

    deployment_id: str
    sha256: str  # the model on probation
    until: float  # monotonic time at which it has served long enough
    terms: Terms
    previous: LoadedModel | None
    baseline_p95: float  # the old model's inference p95 before the swap; 0.0 when it had run no frame
    processed_at_swap: int
    errors_at_swap: int


@dataclass(frozen=True)
class Verdict:
    kind: Literal["wait", "commit", "roll_back"]
    reason: str = ""


def verdict(p: Probation, *, processed: int, errors: int, inference_ms: list[float], last_error: str | None,
            now: float) -> Verdict:
    """Roll back (with why), commit, or wait."""
    new_errors = errors - p.errors_at_swap
    n_new = processed - p.processed_at_swap
    if new_errors >= MAX_ERRORS:
        return Verdict("roll_back", f"{new_errors} inference errors during probation (last: {last_error})")
    allowance = p.terms.latency_factor * p.baseline_p95
    if p.baseline_p95 and n_new >= MIN_FRAMES_FOR_LATENCY:
        p95 = percentile(inference_ms[-min(n_new, len(inference_ms)):], 95)
        # the factor, and a few ms more: on a loaded machine a 2 ms model can briefly read 6 ms.
        if p95 and p95 > allowance and p95 > p.baseline_p95 + MIN_EXTRA_MS:
            return Verdict("roll_back", f"inference p95 {p95:.1f} ms is over {p.terms.latency_factor:g}x the "
                                        f"previous model's {p.baseline_p95:.1f} ms")
    if now < p.until:
        return Verdict("wait")
    if n_new < p.terms.min_frames:
        return Verdict("roll_back", f"only {n_new} frame(s) served in {p.terms.seconds:g} s of probation; at least "
                                    f"{p.terms.min_frames} are needed (does the model hang on real frames?)")
    return Verdict("commit", f"{n_new} frames, {new_errors} errors")


class ProbationRecord:
    """The probation in progress, on disk: written at the swap, removed at commit or rollback."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, p: Probation) -> None:
        data = {"deployment_id": p.deployment_id, "sha256": p.sha256, "terms": asdict(p.terms),
                "until_wall": time.time() + max(0.0, p.until - time.monotonic()), "baseline_p95": p.baseline_p95}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def resume(self, active_sha256: str | None, processed: int, errors: int) -> Probation | None:
        """The probation that a restart interrupted, if the model it was about is still the active one."""
        try:
            data = json.loads(self.path.read_text())
            if data["sha256"] != active_sha256:
                self.clear()  # rolled back or replaced meanwhile
                return None
            left = max(float(data["until_wall"]) - time.time(), RESUME_AT_LEAST_S)
            return Probation(str(data["deployment_id"]), data["sha256"], time.monotonic() + left,
                             Terms(**data["terms"]), None, float(data["baseline_p95"]), processed, errors)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("probation record %s unreadable (%s); the active model is taken as committed", self.path, exc)
            self.clear()
            return None
