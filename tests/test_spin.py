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
    policy.model_changed(spinning=False)  # a new model: worth a new try
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


def test_a_model_change_mid_trial_says_what_the_new_model_does_and_tries_again_from_off():
    policy = SpinPolicy("auto")
    loop = Loop(policy)
    loop.run(HOLD_S + 2, 100, 0.0)
    assert policy.state.spinning and not policy.load_spinning()  # mid-trial: a model loaded now does not spin
    policy.model_changed(spinning=True)  # e.g. a rollback to a model kept loaded with spinning on
    assert policy.state.spinning and policy.state.spinning_won is None
    assert policy.state.reason == "a new model: spinning as it was loaded, tried again from off"
    loop.run(2, 100, 0.0)
    assert loop.asked[-1] == (False, "inference-bound: spinning without a trial of its own; trying again from off")
    asked = len(loop.asked)
    for _ in range(int(HOLD_S) + 2):
        if len(loop.asked) > asked:
            break
        loop.run(1, 100, 0.0)
    assert loop.asked[-1][0] is True, "then a trial of its own"
    loop.run(TRIAL_S + 1, 140, 0.0)
    assert policy.state.spinning_won is True and policy.load_spinning()


def test_a_trial_interrupted_by_a_deployment_measures_again_from_the_start():
    policy = SpinPolicy("auto")
    loop = Loop(policy)
    loop.run(HOLD_S + 2, 100, 0.0)
    loop.run(TRIAL_S - 2, 50, 0.0)  # a validation child took the CPU: these do not count
    policy.interrupted(loop.now)
    loop.run(TRIAL_S + 1, 130, 0.0)
    assert policy.state.spinning_won is True, policy.state


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


def test_a_reload_that_changes_runtime_spin_reopens_the_deployed_model_not_the_configured_one(
        broker, recorder_factory, agent_factory, tmp_path):
    import signal

    import yaml
    from deploy_helpers import copy_model, ctl

    cfg = agent_config(broker, tmp_path, model={"path": str(MODELS / "blazeface.onnx")}, deploy={"probation_s": 0})
    rec = recorder_factory(broker, f"edge/{cfg['device_id']}/#")
    agent = agent_factory(cfg).start()
    v2 = copy_model(MODELS / "blazeface.onnx", tmp_path / "v2", "m.onnx")
    assert ctl(agent.config_path, "deploy", str(v2), "--version", "2.0.0", "--no-golden",
               "--timeout", "60").returncode == 0
    rec.wait_json("/status", lambda s: s["model"]["version"] == "2.0.0")
    cfg["runtime"] = {"spin": "on"}
    agent.config_path.write_text(yaml.safe_dump(cfg))
    agent.signal(signal.SIGHUP)
    status = rec.wait_json("/status", lambda s: s["runtime"]["spin"]["policy"] == "on")[-1]
    assert status["model"]["version"] == "2.0.0" and status["runtime"]["spin"]["spinning"] is True
    n = len(rec.json("/predictions"))
    rec.wait_json("/predictions", count=n + 5)
    assert {p["model"]["version"] for p in rec.json("/predictions")[n:]} == {"2.0.0"}
