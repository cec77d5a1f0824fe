"""The bench's measurements: the bare loop and the agent taking turns at full rate, then the agent at 15 fps.

Bare, twice: the runtime invoked back to back on a ready input tensor, each in a child process of its
own (its RSS is its own): once as a user's hand-written loop runs it (minimal.py: numpy and the
runtime only, the runtime's defaults but the thread count: the figure the ratio is against), once
with the agent's own session settings (bare.py), so the cost of those settings and the cost of the
rest of the agent are seen apart. Agent: the daemon as a subprocess (capture at 640x480, preprocess, inference, decode, MQTT
publish to a private mosquitto), measured from a subscriber. At full rate the three take turns in
1 s slices, each paused (SIGSTOP) while another runs, so a shared machine whose speed drifts
from second to second slows both alike; then the agent alone at 15 fps for capture→subscriber
latency and CPU.
"""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.ctl.bench.bare import ROOT, BareChild
from agent.ctl.bench.broker import LocalBroker
from agent.ctl.bench.subscriber import BulkSubscriber
from agent.support.stats import percentile

SLICE_S = 1.0  # bare and agent take turns in slices this long, so a drifting machine hits both alike
SETTLE_S = 0.1  # the start of each slice is not counted: the process is just waking up


def _progress(label: str, done: float, total: float) -> None:
    if not sys.stderr.isatty():
        return
    n = int(30 * min(done / total, 1.0)) if total else 30
    sys.stderr.write(f"\r{label:<28} [{'#' * n}{'-' * (30 - n)}] {min(done, total):4.0f}/{total:.0f} s")
    sys.stderr.flush()


def _done(label: str, text: str) -> None:
    sys.stderr.write(("\r" if sys.stderr.isatty() else "") + f"{label:<28} {text}\n")
    sys.stderr.flush()


class AgentRun:
    """The daemon on one model as a subprocess, heard by a subscriber on the same machine.

    At full rate the subscriber is a BulkSubscriber (cheap, arrival times to 50 ms); at a camera's
    rate it is paho's, which stamps each message as it arrives, for capture→subscriber latency.
    Either way JSON is decoded afterwards, so the bench's own Python takes as little as possible of
    the CPU the agent runs on.
    """

    def __init__(self, model_path: Path, threads: int, source: str, fps: float, work: Path, broker: LocalBroker,
                 *, root: Path = ROOT):
        import paho.mqtt.client as paho
        import yaml
        from paho.mqtt.enums import CallbackAPIVersion

        self.dev = dev = f"bench-{int(fps)}"
        self.log = work / f"{dev}.log"
        cfg = {"device_id": dev, "mqtt": {"url": f"mqtt://127.0.0.1:{broker.port}"},
               "camera": {"source": source, "fps": fps, "width": 640, "height": 480},
               "model": {"path": str(model_path)}, "runtime": {"threads": threads}, "health": {"interval_s": 1},
               "state_dir": str(work / f"state-{dev}"), "log_level": "warning"}
        cfg_path = work / f"{dev}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        topics = [f"edge/{dev}/predictions", f"edge/{dev}/health", f"edge/{dev}/status"]
        self._raw: list[tuple[float, str, bytes]] = []  # (arrival, topic, payload): list.append is atomic
        self.bulk = self.sub = None
        if fps:
            def on_msg(c, u, m):
                if not m.retain:  # an earlier run's retained health is not this run's
                    self._raw.append((time.time(), m.topic, m.payload))

            self.sub = paho.Client(CallbackAPIVersion.VERSION2)
            self.sub.on_message = on_msg
            self.sub.connect("127.0.0.1", broker.port)
            self.sub.subscribe([(t, 0) for t in topics])
            self.sub.loop_start()
        else:
            self.bulk = BulkSubscriber(broker.port, topics)
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.daemon", "--config", str(cfg_path)], cwd=root,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))

    def _messages(self) -> list[tuple[float, str, bytes]]:
        return self.bulk.messages() if self.bulk is not None else list(self._raw)

    def predictions_seen(self) -> int:
        """How many predictions the subscriber has received so far (nothing decoded)."""
        return sum(topic.endswith("/predictions") for _, topic, _ in self._messages())

    def spin(self) -> dict | None:
        """The agent's spin-wait state (runtime.spin) from its newest status, if any."""
        status = [p for _, topic, p in self._messages() if topic.endswith("/status")]
        return json.loads(status[-1]).get("runtime", {}).get("spin") if status else None

    def wait_spin_settled(self, timeout: float = 60.0) -> dict | None:
        """With runtime.spin: auto at full rate the agent tries spinning first; measure what it settles on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spin = self.spin()
            if spin is not None and (spin["policy"] != "auto" or spin["spinning_won"] is not None
                                     or "no spin-wait" in spin["reason"]):
                if spin["spinning_won"] is False:
                    time.sleep(2.0)  # the switch back finishes
                return self.spin()
            _progress("agent, settling runtime.spin", timeout - (deadline - time.monotonic()), timeout)
            time.sleep(0.5)
        return self.spin()

    def wait_started(self, warm_s: float = 2.0) -> None:
        """Until the first prediction arrives, then ``warm_s`` more (caches, threads, the first health)."""
        deadline = time.monotonic() + 60
        while not self.predictions_seen():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                lines = self.log.read_text(errors="replace").split("\n") if self.log.exists() else []
                last = next((line for line in reversed(lines) if line.strip()), "no output")
                raise RuntimeError(f"the agent did not start: {last} (whole log: {self.log})")
            time.sleep(0.1)
        time.sleep(warm_s)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def messages(self) -> tuple[list[tuple[float, dict]], list[dict]]:
        """(arrival, prediction) pairs and health payloads received so far, decoded now."""
        raw = self._messages()
        preds = [(t, json.loads(p)) for t, topic, p in raw if topic.endswith("/predictions")]
        return preds, [json.loads(p) for _, topic, p in raw if topic.endswith("/health")]

    def stop(self) -> None:
        self.resume()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.sub is not None:
            self.sub.loop_stop()
        if self.bulk is not None:
            self.bulk.close()


def _in_windows(times, windows: list[tuple[float, float]]) -> int:
    arr = np.asarray(times, dtype=np.float64)
    return int(sum(((arr >= a) & (arr <= b)).sum() for a, b in windows))


def rate_in(times, windows: list[tuple[float, float]]) -> float:
    """Events per second of ``times`` that fall inside ``windows`` (their time, not the wall clock's)."""
    return _in_windows(times, windows) / sum(z - a for a, z in windows)


def take_turns(procs: dict, turns: int, slice_s: float, label: str = "") -> dict[str, list[tuple[float, float]]]:
    """Run paused processes one at a time, ``slice_s`` each, ``turns`` rounds in order ABBA….

    Returns each one's windows (wall-clock start, end), less the first SETTLE_S of each: what a
    process made inside its own windows is what counts, so a drifting machine slows all alike.
    """
    names = list(procs)
    windows: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for i in range(turns):
        if label:
            _progress(label, i * len(names) * slice_s, turns * len(names) * slice_s)
        for name in names if i % 2 == 0 else names[::-1]:  # ABBA: a trend hits every process alike
            procs[name].resume()
            t0 = time.time()
            time.sleep(slice_s)
            t1 = time.time()
            procs[name].pause()
            windows[name].append((t0 + SETTLE_S, t1))
    return windows


def _bare_figures(b: dict, windows: list[tuple[float, float]]) -> dict:
    """fps inside its own windows, and the p50/p99 of the invokes that ran wholly inside them."""
    ends = np.asarray(b["ends"])
    starts = ends - np.asarray(b["durations"])
    inside = np.zeros(len(ends), bool)
    for a, z in windows:
        inside |= (starts >= a) & (ends <= z)
    ms = list(np.asarray(b["durations"])[inside] * 1e3)
    return {"fps": rate_in(ends, windows), "slice_fps": [rate_in(ends, [w]) for w in windows],
            "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "rss_mb": b["rss_mb"]}


def full_rate(model_path: Path, threads: int, seconds: float, source: str, work: Path, broker: LocalBroker,
              runtime: str) -> dict:
    """At full rate, taking turns in short slices (each paused while another runs): the bare loop with the
    runtime's defaults (``runtime``, in a process of numpy and that runtime only), the bare loop with the
    agent's own session settings, and the agent."""
    n = max(2, round(seconds / SLICE_S))
    slice_s = seconds / n
    procs: dict = {}
    try:
        for name, child in (("default", lambda: BareChild(model_path, threads, runtime)),
                            ("bare", lambda: BareChild(model_path, threads))):
            procs[name] = child()
            procs[name].pause()
        procs["agent"] = agent = AgentRun(model_path, threads, source, 0, work, broker)
        agent.wait_started()
        spin = agent.wait_spin_settled()
        agent.pause()
        windows = take_turns(procs, n, slice_s, "bare loops and agent, full rate")
        d, b = procs["default"].finish(), procs["bare"].finish()
        agent.resume()
        time.sleep(0.3)  # the last messages reach the subscriber
        preds, health = agent.messages()
    finally:
        for name in ("default", "bare"):
            if name in procs:
                procs[name].kill()
        if "agent" in procs:
            procs["agent"].stop()
    default, bare = _bare_figures(d, windows["default"]), _bare_figures(b, windows["bare"])
    agent_in = [p for _, p in preds if any(a <= p["ts"] <= z for a, z in windows["agent"])]
    made = [p["ts"] for _, p in preds]
    return {
        "default_fps": default["fps"], "bare_fps": bare["fps"], "agent_fps": rate_in(made, windows["agent"]),
        "slices": n, "default_slice_fps": default["slice_fps"], "bare_slice_fps": bare["slice_fps"],
        "agent_slice_fps": [rate_in(made, [w]) for w in windows["agent"]],
        "default_p50_ms": default["p50_ms"], "bare_p50_ms": bare["p50_ms"], "bare_p99_ms": bare["p99_ms"],
        "agent_inference_p50_ms": percentile([p["latency_ms"]["inference"] for p in agent_in], 50),
        "default_rss_mb": default["rss_mb"], "bare_rss_mb": bare["rss_mb"],
        # while it was measured: not the moment of a spin-wait switch (two sessions, before the old one is freed)
        "agent_rss_mb": max((h["rss_mb"] for h in health if any(a <= h["ts"] <= z for a, z in windows["agent"])),
                            default=max((h["rss_mb"] for h in health), default=0.0)),
        "default_imports_of_the_agent": d.get("modules", []),
        "frames_dropped": (health[-1]["frames_dropped"] - health[0]["frames_dropped"]) if health else 0,
        "backend": b["backend"], "accelerator": b["accelerator"], "spin": spin,
    }


def paced(model_path: Path, threads: int, seconds: float, source: str, fps: float, work: Path,
          broker: LocalBroker) -> dict:
    """The agent alone at a camera's rate: capture→subscriber latency and CPU."""
    agent = AgentRun(model_path, threads, source, fps, work, broker)
    try:
        agent.wait_started()
        t_start = time.time()
        t0 = time.monotonic()
        while (el := time.monotonic() - t0) < seconds:
            _progress(f"agent, {fps:g} fps", el, seconds)
            time.sleep(0.25)
        t_end = time.time()
        preds, health = agent.messages()
        spin = agent.spin()
    finally:
        agent.stop()
    window = [(t, p) for t, p in preds if t_start <= p["ts"] <= t_end]
    hwin = [h for h in health if t_start <= h["ts"] <= t_end]
    return {"e2e_p50_ms": percentile([(t - p["frame_ts"]) * 1e3 for t, p in window], 50),
            "e2e_p99_ms": percentile([(t - p["frame_ts"]) * 1e3 for t, p in window], 99),
            "inference_p99_ms": percentile([p["latency_ms"]["inference"] for _, p in window], 99),
            "cpu_percent": statistics.median([h["cpu_percent"] for h in hwin]) if hwin else 0.0,
            "frames": len(window), "spin": spin}


def _runtime_module(model_path: Path) -> str:
    """The runtime module the agent's probe picks for this model: the one the default bare loop uses."""
    from agent.runtimes.choice import chooser, probe
    from agent.runtimes.registry import detect_format

    return chooser(probe(check_runtimes="first"), model_path)(detect_format(model_path)).module


def bench(model_path: Path, *, seconds: float = 10, threads: int = 0, source: str = "synthetic") -> dict:
    from agent.runtimes import inference_threads

    threads = inference_threads(threads)
    runtime = _runtime_module(model_path)
    work = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    broker = LocalBroker(work).start()
    try:
        full = full_rate(model_path, threads, seconds, source, work, broker, runtime)
        _done("bare loops and agent, full rate", f"bare {full['default_fps']:.1f} fps (defaults), "
                                                 f"{full['bare_fps']:.1f} (agent's settings), agent "
                                                 f"{full['agent_fps']:.1f} fps ({full['slices']} slices each)")
        slow = paced(model_path, threads, min(seconds, 10), source, 15, work, broker)
        _done("agent, 15 fps", f"{slow['cpu_percent']:.0f} % CPU, e2e p99 {slow['e2e_p99_ms']:.1f} ms")
    finally:
        broker.stop()
    shutil.rmtree(work, ignore_errors=True)  # kept when something failed: the error names a log in it
    return {
        "model": str(model_path), "threads": threads, "backend": full["backend"], "accelerator": full["accelerator"],
        "runtime": runtime, "default_fps": full["default_fps"], "ratio": full["agent_fps"] / full["default_fps"],
        "overhead_ms_per_frame": 1000 / full["agent_fps"] - 1000 / full["default_fps"],
        "bare_fps": full["bare_fps"], "agent_fps": full["agent_fps"],
        "ratio_agent_settings": full["agent_fps"] / full["bare_fps"], "slices": full["slices"],
        "default_slice_fps": full["default_slice_fps"], "bare_slice_fps": full["bare_slice_fps"],
        "agent_slice_fps": full["agent_slice_fps"], "default_p50_ms": full["default_p50_ms"],
        "bare_p50_ms": full["bare_p50_ms"], "bare_p99_ms": full["bare_p99_ms"],
        "agent_inference_p50_ms": full["agent_inference_p50_ms"],
        "e2e_p50_ms_15fps": slow["e2e_p50_ms"], "e2e_p99_ms_15fps": slow["e2e_p99_ms"],
        "inference_p99_ms_15fps": slow["inference_p99_ms"],
        "default_rss_mb": full["default_rss_mb"], "bare_rss_mb": full["bare_rss_mb"],
        "agent_rss_mb": full["agent_rss_mb"], "default_imports_of_the_agent": full["default_imports_of_the_agent"],
        "cpu_percent_15fps": slow["cpu_percent"], "frames_dropped_full_rate": full["frames_dropped"],
        "spin_full_rate": full["spin"], "spin_15fps": slow["spin"],
    }
