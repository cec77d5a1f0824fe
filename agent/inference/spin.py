"""Whether the runtime's thread pool spin-waits between runs: a policy, not a constant (``runtime.spin``).

Spin-waiting keeps ONNX Runtime's intra-op workers hot between the parallel parts of a run and
between runs: at full rate that won ~20 % on a MobileNetV2-shaped model here, and lost ~8 % on
BlazeFace; at 15 fps it burns a core doing nothing (102 % vs 12 % of a core on BlazeFace). So:

- ``on`` / ``off`` pin it.
- ``auto`` starts without spinning. While the frame loop is **inference-bound** (it almost never
  waits for a frame) for ``HOLD_S``, it tries spinning for ``TRIAL_S`` and keeps it only if the
  model then runs at least ``MIN_GAIN`` faster; while it is **camera-bound** (it waits for most
  frames) spinning goes off. A verdict stands until the regime or the model changes.

``SpinPolicy.observe`` is pure bookkeeping on counters (tested with a fake clock); the daemon acts
on what it returns by reloading the model with the other setting and swapping it in between frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.support.stats import percentile

HOLD_S = 5.0  # a regime must last this long before anything changes
TRIAL_S = 6.0  # how long spinning is tried (its first SETTLE_S not counted)
SETTLE_S = 1.0
MIN_GAIN = 1.05  # spinning must be this much faster to stay on
INFERENCE_BOUND = 0.2  # at most this share of takes waited for a frame
CAMERA_BOUND = 0.5  # at least this share waited


@dataclass(frozen=True)
class SpinState:
    policy: str  # auto | on | off
    spinning: bool
    reason: str
    spinning_won: bool | None = None  # auto: the last trial's verdict in this regime; None = not tried

    def to_json(self) -> dict:
        return {"policy": self.policy, "spinning": self.spinning, "reason": self.reason,
                "spinning_won": self.spinning_won}


class SpinPolicy:
    def __init__(self, policy: str, applies: bool = True):
        self.reset(policy, applies)

    def reset(self, policy: str, applies: bool | None = None) -> None:
        """Start over with ``policy`` (a reload changed runtime.spin)."""
        applies = self.applies if applies is None else applies
        self.policy = policy
        self.applies = applies  # the backend has the setting (onnxruntime); otherwise it stays as it is
        spinning = policy == "on" and applies
        if not applies:
            reason = "the runtime has no spin-wait setting"
        elif policy == "auto":
            reason = "starting without spinning until the frame loop is seen inference-bound"
        else:
            reason = f"pinned by runtime.spin: {policy}"
        self.state = SpinState(policy, spinning, reason)
        self._last: tuple[float, int, int] | None = None  # now, takes, waits
        self._regime: str | None = None
        self._since = 0.0
        self._fps_off: list[float] = []  # per-tick fps while not spinning in the current regime
        self._pending: float | None = None  # fps without spinning, while a trial waits to be applied
        self._trial: tuple[float, float] | None = None  # (started, fps without spinning) while trying
        self._trial_fps: list[float] = []
        self._verdict: bool | None = None  # spinning won (True) or lost (False) in this regime

    def set_applies(self, applies: bool) -> None:
        """Whether the serving model's runtime has the setting (onnxruntime on the CPU); said in the state."""
        if applies != self.applies:
            self.reset(self.policy, applies)
        elif not applies:
            self.state = SpinState(self.policy, False, "the runtime has no spin-wait setting")

    def load_spinning(self) -> bool:
        """Whether a model loaded now should spin: pinned on, or auto after spinning won (not mid-trial)."""
        return self.policy == "on" or (self.policy == "auto" and self.state.spinning_won is True)

    def model_changed(self, spinning: bool) -> None:
        """A new model serves (deployment, rollback, reload), its session loaded ``spinning`` or not: what was
        learnt about the last one is forgotten, and the state says what this one does."""
        self._verdict = None
        self._trial = self._pending = None
        self._fps_off.clear()
        spinning = spinning and self.applies
        if self.policy == "auto" and self.applies:
            self.state = SpinState("auto", spinning, "a new model: spinning as it was loaded, tried again from off"
                                   if spinning else "a new model: without spinning until the frame loop is seen "
                                   "inference-bound")
        elif self.applies:
            self.state = SpinState(self.policy, spinning, self.state.reason)

    def interrupted(self, now: float) -> None:
        """Something else ran meanwhile (a deployment): a trial under way starts its measurement again."""
        if self._trial is not None:
            self._trial = (now, self._trial[1])
            self._trial_fps = []

    def applied(self, spinning: bool, reason: str, now: float) -> None:
        """The daemon made the change ``observe`` asked for (a trial's clock starts now)."""
        self.state = SpinState(self.policy, spinning, reason, self._verdict)
        if spinning and self._pending is not None:
            self._trial, self._pending = (now, self._pending), None
            self._trial_fps = []

    def not_applied(self, why: str) -> None:
        """The change could not be made (the model did not load again): no more tries in this regime."""
        self._pending, self._trial, self._verdict = None, None, False
        self.state = SpinState(self.policy, self.state.spinning, f"{self.state.reason} (a switch failed: {why})")

    def observe(self, now: float, fps: float | None, takes: int, waits: int) -> tuple[bool, str] | None:
        """Feed the frame loop's rate since the last call and its take/wait counters (about once a second);
        (spin, why) when the setting should change.

        ``fps`` is from the median time between frames (``frame_rate``), so a stretch where the process
        was stopped (SIGSTOP, a benchmark's turns) does not read as slow frames.
        """
        last, self._last = self._last, (now, takes, waits)
        if self.policy != "auto" or not self.applies or last is None:
            return None
        d_takes = takes - last[1]
        if fps is None or d_takes <= 0:
            return None
        waited = (waits - last[2]) / d_takes
        regime = "inference" if waited <= INFERENCE_BOUND else "camera" if waited >= CAMERA_BOUND else self._regime
        if regime != self._regime:
            self._regime, self._since = regime, now
            self._verdict, self._trial, self._pending = None, None, None
            self._fps_off.clear()
        if self._pending is not None:  # asked for, not applied yet
            return None
        spinning = self.state.spinning
        if self._trial is not None:
            started, fps_off = self._trial
            if now - started > SETTLE_S:
                self._trial_fps.append(fps)
            if now - started < TRIAL_S:
                return None
            fps_on = percentile(self._trial_fps, 50)  # 0.0 when no sample came
            self._trial = None
            self._verdict = fps_on >= fps_off * MIN_GAIN
            if self._verdict:
                self.state = SpinState("auto", True, f"inference-bound: spinning gave {fps_on:.1f} fps against "
                                                     f"{fps_off:.1f} without", True)
                return None
            return False, f"inference-bound, but spinning gave {fps_on:.1f} fps against {fps_off:.1f} without: off"
        if not spinning:
            self._fps_off.append(fps)
        if now - self._since < HOLD_S:
            return None
        if regime == "camera" and spinning:
            return False, "camera-bound: the frame loop waits for frames, spinning would burn the cores"
        if regime == "inference" and spinning and self._verdict is None:  # spinning on no evidence (a new model)
            return False, "inference-bound: spinning without a trial of its own; trying again from off"
        if regime == "inference" and not spinning and self._verdict is None and len(self._fps_off) >= 3:
            self._pending = percentile(self._fps_off[-int(HOLD_S):], 50)
            return True, f"inference-bound: trying spinning (without: {self._pending:.1f} fps)"
        return None


def frame_rate(done: list[float], since: float) -> float | None:
    """Frames per second from the median gap between the frame loop's completion times after ``since``."""
    times = [t for t in done if t > since]
    if len(times) < 5:
        return None
    gap = percentile((b - a for a, b in zip(times, times[1:], strict=False)), 50)
    return 1.0 / gap if gap > 0 else None
