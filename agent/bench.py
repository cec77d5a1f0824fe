"""agent-ctl bench: the bare interpreter and the whole agent on the same model, threads and machine.

Bare: the runtime invoked back to back on a ready input tensor, in a child process (its RSS is its
own). Agent: the daemon as a subprocess (capture at 640x480, preprocess, inference, decode, MQTT
publish to a private mosquitto), measured from a subscriber. At full rate the two take turns in
1 s slices, each paused (SIGSTOP) while the other runs, so a shared machine whose speed drifts
from second to second slows both alike; then the agent alone at 15 fps for capture→subscriber
latency and CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else 0.0


def _progress(label: str, done: float, total: float) -> None:
    if not sys.stderr.isatty():
        return
    n = int(30 * min(done / total, 1.0)) if total else 30
    sys.stderr.write(f"\r{label:<28} [{'#' * n}{'-' * (30 - n)}] {min(done, total):4.0f}/{total:.0f} s")
    sys.stderr.flush()


def _done(label: str, text: str) -> None:
    sys.stderr.write(("\r" if sys.stderr.isatty() else "") + f"{label:<28} {text}\n")
    sys.stderr.flush()


# -- bare ----------------------------------------------------------------------------------------

SLICE_S = 1.0  # bare and agent take turns in slices this long, so a drifting machine hits both alike
SETTLE_S = 0.1  # the start of each slice is not counted: the process is just waking up


def bare_serve(model_path: Path, threads: int) -> None:
    """The bare loop, in its own process: invoke back to back on a ready tensor until SIGTERM.

    Prints ``ready`` once warm; the parent pauses and resumes this process (SIGSTOP/SIGCONT) and
    counts the invokes that ended inside its own windows. On SIGTERM, prints every invoke's end
    time and duration, and the process RSS, as one JSON line.
    """
    import signal as _signal
    from array import array

    import psutil

    from agent import probe
    from agent.camera import SyntheticSource
    from agent.model import load_model

    stop = []
    _signal.signal(_signal.SIGTERM, lambda *_: stop.append(True))
    facts = probe.probe(check_runtimes="first")
    model = load_model(model_path, lambda fmt: probe.choose_runtime(facts, fmt), threads=threads)
    session = model.session
    frame = SyntheticSource(640, 480).read()
    view = getattr(session, "input_view", None)
    if view is not None:  # TFLite: the tensor sits in the interpreter; invoke() alone
        buf = view(0)
        model.preprocessor(frame, buf)
        del buf
        call = lambda: session.run(None)  # noqa: E731
    else:  # ONNX Runtime: its own run() with a feed dict, as a hand-written loop calls it
        tensor, _ = model.preprocessor(frame)
        feed = {session.inputs[0].name: tensor.copy()}
        call = lambda: session.ort.run(None, feed)  # noqa: E731
    for _ in range(10):
        call()
    ends, durations = array("d"), array("d")
    print("ready", flush=True)
    clock = time.time  # the parent's windows are in wall-clock time too
    while not stop:
        t = clock()
        call()
        e = clock()
        ends.append(e)
        durations.append(e - t)
    print(json.dumps({"ends": ends.tolist(), "durations": durations.tolist(),
                      "rss_mb": psutil.Process().memory_info().rss / 2**20, "backend": session.info.backend,
                      "accelerator": session.info.accelerator}))


class BareChild:
    """``bare_serve`` in a child process, paused and resumed by the parent."""

    def __init__(self, model_path: Path, threads: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.bench", str(model_path), str(threads)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        if self.proc.stdout.readline().strip() != "ready":  # loaded and warm, or dead
            _, err = self.proc.communicate()
            raise RuntimeError(f"bare run failed: {(err.strip().splitlines() or ['?'])[-1]}")

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def finish(self) -> dict:
        self.resume()
        self.proc.terminate()
        out, err = self.proc.communicate(timeout=60)
        if self.proc.returncode != 0:
            raise RuntimeError(f"bare run failed: {(err.strip().splitlines() or ['?'])[-1]}")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- agent ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """A private mosquitto on a free port of 127.0.0.1, for the bench and the scripts in scripts/bench."""

    def __init__(self, work: Path, extra_conf: str = ""):
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError("bench needs mosquitto (apt-get install mosquitto) for the agent's MQTT publish")
        self.port = _free_port()
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n" + extra_conf
                        + ("user root\n" if os.geteuid() == 0 else ""))
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("the bench's mosquitto did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


class BulkSubscriber:
    """A minimal MQTT 3.1.1 subscriber that reads its socket in bulk, 20 times a second.

    paho reads one packet per call with several small recv()s: at full rate that subscriber took
    0.2 ms of CPU per message on the 2 cores the agent is measured on. This one timestamps and
    keeps what arrives, and parses it afterwards.
    """

    TICK_S = 0.05

    def __init__(self, port: int, topics: list[str]):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        cid = f"bench-sub-{os.getpid()}".encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid  # clean session, 60 s
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        if self._recv_exactly(4)[:2] != b"\x20\x02":
            raise RuntimeError("the bench's broker refused the subscriber")
        subs = b"".join(len(t.encode()).to_bytes(2, "big") + t.encode() + b"\x00" for t in topics)
        body = b"\x00\x01" + subs
        self.sock.sendall(b"\x82" + _varint(len(body)) + body)
        ack = self._recv_exactly(4 + len(topics))
        if ack[0] != 0x90 or any(code >= 0x80 for code in ack[4:]):
            raise RuntimeError("the bench's broker refused the subscription")
        self.sock.setblocking(False)
        self.chunks: list[tuple[float, bytes]] = []  # list.append is atomic
        self._taken = 0  # chunks parsed so far
        self._buf = bytearray()  # what is left of them: the start of a message not all here yet
        self._parsed: list[tuple[float, str, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sub", daemon=True)
        self._thread.start()

    def _recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.sock.recv(n - len(data))
            if not more:
                raise RuntimeError("the bench's broker closed the connection")
            data += more
        return data

    def _run(self) -> None:
        last_ping = time.monotonic()
        while not self._stop.wait(self.TICK_S):
            while True:
                try:
                    data = self.sock.recv(1 << 20)
                except BlockingIOError:
                    break
                if not data:
                    return
                self.chunks.append((time.time(), data))
            if time.monotonic() - last_ping > 20:
                self.sock.send(b"\xc0\x00")  # PINGREQ; the PINGRESP is skipped when parsing
                last_ping = time.monotonic()

    def messages(self) -> list[tuple[float, str, bytes]]:
        """(arrival, topic, payload) of every PUBLISH so far (arrival to within TICK_S).

        Parses only what came since the last call (call it from one thread).
        """
        while self._taken < len(self.chunks):
            arrival, data = self.chunks[self._taken]
            self._taken += 1
            self._buf += data
            self._parse(arrival)
        return list(self._parsed)

    def _parse(self, arrival: float) -> None:
        buf, pos = self._buf, 0
        while pos + 2 <= len(buf):
            length, shift, i = 0, 0, pos + 1  # remaining length: 1-4 bytes, 7 bits each
            while i < len(buf):
                length |= (buf[i] & 0x7F) << shift
                shift += 7
                i += 1
                if not buf[i - 1] & 0x80:
                    break
            else:
                break  # the length itself is not all here yet
            if i + length > len(buf):
                break
            if buf[pos] >> 4 == 3 and not buf[pos] & 0x01:  # PUBLISH at QoS 0, not a retained copy
                tlen = int.from_bytes(buf[i:i + 2], "big")
                self._parsed.append((arrival, buf[i + 2:i + 2 + tlen].decode(), bytes(buf[i + 2 + tlen:i + length])))
            pos = i + length
        del buf[:pos]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


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
        topics = [f"edge/{dev}/predictions", f"edge/{dev}/health"]
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


def full_rate(model_path: Path, threads: int, seconds: float, source: str, work: Path, broker: LocalBroker) -> dict:
    """Bare loop and agent at full rate, taking turns in short slices (each paused while the other runs)."""
    n = max(2, round(seconds / SLICE_S))
    slice_s = seconds / n
    bare = BareChild(model_path, threads)
    agent = None
    try:
        bare.pause()
        agent = AgentRun(model_path, threads, source, 0, work, broker)
        agent.wait_started()
        agent.pause()
        windows = take_turns({"bare": bare, "agent": agent}, n, slice_s, "bare and agent, full rate")
        b = bare.finish()
        agent.resume()
        time.sleep(0.3)  # the last messages reach the subscriber
        preds, health = agent.messages()
    finally:
        bare.kill()
        if agent is not None:
            agent.stop()
    ends = np.asarray(b["ends"])
    starts = ends - np.asarray(b["durations"])
    inside = np.zeros(len(ends), bool)
    for a, z in windows["bare"]:
        inside |= (starts >= a) & (ends <= z)
    bare_ms = np.asarray(b["durations"])[inside] * 1e3
    agent_in = [p for _, p in preds if any(a <= p["ts"] <= z for a, z in windows["agent"])]
    made = [p["ts"] for _, p in preds]
    return {
        "bare_fps": rate_in(ends, windows["bare"]),
        "agent_fps": rate_in(made, windows["agent"]),
        "slices": n, "bare_slice_fps": [rate_in(ends, [w]) for w in windows["bare"]],
        "agent_slice_fps": [rate_in(made, [w]) for w in windows["agent"]],
        "bare_p50_ms": _pct(list(bare_ms), 50), "bare_p99_ms": _pct(list(bare_ms), 99),
        "agent_inference_p50_ms": _pct([p["latency_ms"]["inference"] for p in agent_in], 50),
        "bare_rss_mb": b["rss_mb"], "agent_rss_mb": max((h["rss_mb"] for h in health), default=0.0),
        "frames_dropped": (health[-1]["frames_dropped"] - health[0]["frames_dropped"]) if health else 0,
        "backend": b["backend"], "accelerator": b["accelerator"],
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
    finally:
        agent.stop()
    window = [(t, p) for t, p in preds if t_start <= p["ts"] <= t_end]
    hwin = [h for h in health if t_start <= h["ts"] <= t_end]
    return {"e2e_p50_ms": _pct([(t - p["frame_ts"]) * 1e3 for t, p in window], 50),
            "e2e_p99_ms": _pct([(t - p["frame_ts"]) * 1e3 for t, p in window], 99),
            "inference_p99_ms": _pct([p["latency_ms"]["inference"] for _, p in window], 99),
            "cpu_percent": statistics.median([h["cpu_percent"] for h in hwin]) if hwin else 0.0,
            "frames": len(window)}


def bench(model_path: Path, *, seconds: float = 10, threads: int = 0, source: str = "synthetic") -> dict:
    from agent.runtimes import inference_threads

    threads = inference_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    broker = LocalBroker(work)
    try:
        full = full_rate(model_path, threads, seconds, source, work, broker)
        _done("bare and agent, full rate", f"bare {full['bare_fps']:.1f} fps, agent {full['agent_fps']:.1f} fps "
                                           f"({full['slices']} slices each)")
        slow = paced(model_path, threads, min(seconds, 10), source, 15, work, broker)
        _done("agent, 15 fps", f"{slow['cpu_percent']:.0f} % CPU, e2e p99 {slow['e2e_p99_ms']:.1f} ms")
    finally:
        broker.stop()
    shutil.rmtree(work, ignore_errors=True)  # kept when something failed: the error names a log in it
    return {
        "model": str(model_path), "threads": threads, "backend": full["backend"], "accelerator": full["accelerator"],
        "bare_fps": full["bare_fps"], "agent_fps": full["agent_fps"], "ratio": full["agent_fps"] / full["bare_fps"],
        "overhead_ms_per_frame": 1000 / full["agent_fps"] - 1000 / full["bare_fps"], "slices": full["slices"],
        "bare_slice_fps": full["bare_slice_fps"], "agent_slice_fps": full["agent_slice_fps"],
        "bare_p50_ms": full["bare_p50_ms"], "bare_p99_ms": full["bare_p99_ms"],
        "agent_inference_p50_ms": full["agent_inference_p50_ms"],
        "e2e_p50_ms_15fps": slow["e2e_p50_ms"], "e2e_p99_ms_15fps": slow["e2e_p99_ms"],
        "inference_p99_ms_15fps": slow["inference_p99_ms"],
        "bare_rss_mb": full["bare_rss_mb"], "agent_rss_mb": full["agent_rss_mb"],
        "cpu_percent_15fps": slow["cpu_percent"], "frames_dropped_full_rate": full["frames_dropped"],
    }


def format_table(r: dict) -> str:
    lines = [
        f"{Path(r['model']).name} on {r['backend']}/{r['accelerator']}, {r['threads']} threads",
        f"  throughput        bare {r['bare_fps']:8.1f} fps   agent {r['agent_fps']:8.1f} fps   ratio {r['ratio']:.3f}",
        f"  agent overhead    {r['overhead_ms_per_frame']:+.3f} ms per frame",
        f"  bare latency      p50 {r['bare_p50_ms']:.2f} ms  p99 {r['bare_p99_ms']:.2f} ms   "
        f"(agent's own inference p50 {r['agent_inference_p50_ms']:.2f} ms)",
        f"  at 15 fps         capture→subscriber p50 {r['e2e_p50_ms_15fps']:.2f} ms  p99 {r['e2e_p99_ms_15fps']:.2f} ms "
        f"(inference p99 {r['inference_p99_ms_15fps']:.2f} ms)",
        f"  RSS               bare {r['bare_rss_mb']:.0f} MB   agent {r['agent_rss_mb']:.0f} MB "
        f"({r['agent_rss_mb'] - r['bare_rss_mb']:+.0f} MB)",
        f"  CPU at 15 fps     {r['cpu_percent_15fps']:.0f} % (of one core)",
    ]
    return "\n".join(lines)


def cmd_bench(args) -> int:
    from agent import ctl

    model = Path(args.model)
    if not model.is_file():
        raise ctl.UsageError(f"model file not found: {model}")
    source = args.source
    if source != "synthetic" and not Path(source).exists():
        raise ctl.UsageError(f"--source: {source} not found (synthetic, or a video file / images:DIR)")
    try:
        result = bench(model, seconds=args.seconds, threads=args.threads, source=source)
    except RuntimeError as exc:
        raise ctl.CtlError(str(exc)) from None
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return ctl.EXIT_OK


def add_parser(sub) -> None:
    sp = sub.add_parser("bench", help="bare interpreter vs the whole agent on one model, side by side")
    sp.add_argument("model")
    sp.add_argument("--seconds", type=float, default=10, help="seconds each for bare and agent at full rate, taken in 1 s turns; also the 15 fps phase, up to 10 (default 10)")
    sp.add_argument("--threads", type=int, default=0, help="inference threads (default: as the agent picks for runtime.threads: 0)")
    sp.add_argument("--source", default="synthetic", help="synthetic (640x480), a video file, or images:DIR")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_bench)


if __name__ == "__main__":  # the bare child: MODEL THREADS
    bare_serve(Path(sys.argv[1]), int(sys.argv[2]))
