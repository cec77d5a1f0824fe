"""runtime.spin: the spin-wait policy on a fake clock, and the daemon switching it between frames."""

from __future__ import annotations

from conftest import MODELS, agent_config, wait_until

from agent.inference.spin import HOLD_S, TRIAL_S, SpinPolicy, frame_rate


class Loop:
    """Counters of a frame loop: each tick, ``takes`` frames asked for, ``waited`` of them waited for."""

    def __init__(self, policy: SpinPolicy):
        self.policy = policy
        self.now = 0.0
        self.takes = self.waits = 0
        self.asked: list[tuple[bool, str]] = []

    def run(self, seconds: float, fps: float, waited: float, *, apply: bool = True) -> None:
        for _ in range(int(seconds)):
            self.now += 1.0
            self.takes += 100
            self.waits += int(100 * waited)
            decision = self.policy.observe(self.now, fps, self.takes, self.waits)
            if decision is not None:
                self.asked.append(decision)
                if apply:
                    self.policy.applied(decision[0], decision[1], self.now)


def test_pinned_settings_never_change_and_a_runtime_without_the_setting_says_so():
    for pin in ("on", "off"):
        policy = SpinPolicy(pin)
        loop = Loop(policy)
        loop.run(30, 100, 0.0)
        loop.run(30, 15, 0.9)
        assert loop.asked == [] and policy.state.spinning is (pin == "on")
        assert policy.state.reason == f"pinned by runtime.spin: {pin}"
    tflite = SpinPolicy("on", applies=False)
    assert tflite.state.spinning is False and tflite.state.reason == "the runtime has no spin-wait setting"


def test_auto_tries_spinning_when_inference_bound_and_keeps_it_only_if_it_is_faster():
    policy = SpinPolicy("auto")
    loop = Loop(policy)
    loop.run(HOLD_S - 1, 100, 0.05)
    assert loop.asked == [], "nothing before the regime has held"
    loop.run(3, 100, 0.05)
    assert loop.asked == [(True, "inference-bound: trying spinning (without: 100.0 fps)")]
    assert policy.state.spinning and policy.state.spinning_won is None
    loop.run(TRIAL_S + 1, 130, 0.05)  # 30 % faster while spinning: kept
    assert len(loop.asked) == 1 and policy.state.spinning and policy.state.spinning_won is True
    assert policy.state.reason == "inference-bound: spinning gave 130.0 fps against 100.0 without"
    loop.run(30, 130, 0.05)
    assert len(loop.asked) == 1, "a verdict stands while the regime does"
    loop.run(HOLD_S + 1, 15, 0.95)  # the camera got slower than the model: spinning burns cores for nothing
    assert loop.asked[-1] == (False, "camera-bound: the frame loop waits for frames, spinning would burn the cores")
    assert not policy.state.spinning


def test_auto_turns_spinning_back_off_when_it_is_not_faster_and_does_not_try_again_in_that_regime():
    policy = SpinPolicy("auto")
    loop = Loop(policy)
    loop.run(HOLD_S + 2, 150, 0.0)
    loop.run(TRIAL_S + 1, 110, 0.0)
    assert loop.asked[-1] == (False, "inference-bound, but spinning gave 110.0 fps against 150.0 without: off")
    assert not policy.state.spinning and policy.state.spinning_won is False
    loop.run(60, 150, 0.0)
    assert len(loop.asked) == 2
    policy.model_changed()  # a new model: worth a new try
    loop.run(HOLD_S + 2, 150, 0.0)
    assert len(loop.asked) == 3 and loop.asked[-1][0] is True


def test_a_trial_clock_starts_when_the_switch_is_made_and_a_failed_switch_is_not_retried():
    policy = SpinPolicy("auto")
    loop = Loop(policy)
    loop.run(HOLD_S + 2, 100, 0.0, apply=False)
    assert len(loop.asked) == 1
    loop.run(20, 100, 0.0, apply=False)  # not applied yet (the model still loading): nothing more asked
    assert len(loop.asked) == 1
    policy.not_applied("out of memory")
    loop.run(60, 100, 0.0)
    assert len(loop.asked) == 1 and "a switch failed: out of memory" in policy.state.reason


def test_frame_rate_is_the_median_gap_so_a_stopped_process_does_not_read_as_slow():
    times = [i * 0.01 for i in range(50)] + [100 + i * 0.01 for i in range(50)]  # stopped for 100 s between
    assert abs(frame_rate(times, -1) - 100) < 1e-6
    assert frame_rate(times[:3], -1) is None
    assert abs(frame_rate(times, 100.0) - 100) < 1e-6


def test_the_daemon_reports_its_spin_state_and_a_switch_keeps_every_frame(broker, recorder_factory, agent_factory,
                                                                         tmp_path):
    cfg = agent_config(broker, tmp_path, model={"path": str(MODELS / "blazeface.onnx")},
                       camera={"source": "synthetic", "fps": 0})
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/#")
    agent = agent_factory(cfg).start()
    # full rate: inference-bound, so auto tries spinning, then keeps or drops it with its figures
    status = rec.wait_json("/status", lambda s: s["runtime"]["spin"]["spinning_won"] is not None, timeout=60)[0]
    spin = status["runtime"]["spin"]
    assert spin["policy"] == "auto" and "spinning gave" in spin["reason"]
    assert "spin-wait on (inference-bound: trying spinning" in agent.log()
    wait_until(lambda: rec.json("/predictions")[-1]["seq"] > 200, 20, what="predictions after the switch")
    agent.stop()
    seqs = [p["seq"] for p in rec.json("/predictions")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a prediction went missing over the switches"
    health = rec.json("/health")
    assert health[-1]["inference_errors"] == 0


def test_pinned_on_at_a_cameras_rate_stays_on_and_tflite_says_it_has_no_setting(broker, recorder_factory,
                                                                                agent_factory, tmp_path):
    cfg = agent_config(broker, tmp_path, model={"path": str(MODELS / "blazeface.onnx")}, runtime={"spin": "on"})
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/status")
    agent_factory(cfg).start()
    spin = rec.wait_json("/status")[0]["runtime"]["spin"]
    assert spin == {"policy": "on", "spinning": True, "reason": "pinned by runtime.spin: on", "spinning_won": None}
    cfg = agent_config(broker, tmp_path, runtime={"spin": "on"})  # the bundled .tflite
    rec2 = recorder_factory(broker, f"edge/{cfg['device_id']}/status")
    agent_factory(cfg, name="tflite").start()
    spin = rec2.wait_json("/status")[0]["runtime"]["spin"]
    assert spin["spinning"] is False and spin["reason"] == "the runtime has no spin-wait setting"
