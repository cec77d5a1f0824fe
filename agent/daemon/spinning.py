"""Acting on the spin policy (agent/inference/spin.py): the active model reopened with the other
setting on a thread of its own, warmed up, and swapped in between two frames, as a deployment is.

Not while a deployment is under way (received → committed or a failure): its probation compares
the new model with the old one, and a swap of ours in the middle would muddle that.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from agent.inference.loader import reopen
from agent.inference.spin import SpinPolicy, frame_rate
from agent.runtimes import inference_threads
from agent.support.threads import name_this_thread
from agent.vocab import TERMINAL_STATES

log = logging.getLogger(__name__)


class Respinner:
    def __init__(self, agent, policy: SpinPolicy):
        self.agent = agent
        self.policy = policy
        self._deploying = False
        self._thread: threading.Thread | None = None
        self._last_tick = time.monotonic()
        self._held = False

    def on_event(self, event: dict) -> None:
        state = event.get("state")
        if state == "received":
            self._deploying = True
        elif state in TERMINAL_STATES:
            self._deploying = False

    def tick(self, now: float) -> None:
        a = self.agent
        since, self._last_tick = self._last_tick, now
        if self._deploying or (self._thread is not None and self._thread.is_alive()):
            self._held = True  # nothing is decided while a deployment or a switch runs: no decision is lost
            return
        if self._held:
            self._held = False
            self.policy.interrupted(now)
            return  # this tick's window overlapped what ran meanwhile
        fps = frame_rate(list(a.pipeline.stats.done_mono), since)
        before = self.policy.state
        decision = self.policy.observe(now, fps, a.slot.takes, a.slot.waits)
        if self.policy.state != before:  # a trial's verdict that keeps the setting
            log.info("spin-wait %s: %s", "on" if self.policy.state.spinning else "off", self.policy.state.reason)
            a.publish_status()
        if decision is None:
            return
        spin, why = decision
        # A thread at the daemon's own priority: the runtime's workers are created by it and inherit it.
        self._thread = threading.Thread(target=self._switch, args=(spin, why), name="respin", daemon=True)
        self._thread.start()

    def _switch(self, spin: bool, why: str) -> None:
        name_this_thread("ea-respin")
        a = self.agent
        base = a.model
        if base.choice is None:  # loaded without a recorded choice: nothing to reopen it with
            self.policy.not_applied("the model has no runtime choice to reopen it with")
            return
        choice = dataclasses.replace(base.choice, spin=spin)
        t0 = time.monotonic()
        try:
            new = reopen(base, choice, threads=inference_threads(a.cfg.runtime.threads), cache_dir=None)
        except Exception as exc:  # noqa: BLE001 - keep serving the model as it is
            log.error("spin-wait %s: the model did not load again (%s); it stays as it is",
                      "on" if spin else "off", exc)
            self.policy.not_applied(str(exc))
            return
        if not a.swap_if_current(base, new):
            new.close()  # a deployment or rollback swapped first: its model stays
            return
        self.policy.applied(spin, why, time.monotonic())
        log.info("spin-wait %s (%s); switched in %.0f ms", "on" if spin else "off", why,
                 (time.monotonic() - t0) * 1000)
        a.publish_status()
