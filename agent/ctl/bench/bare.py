"""The bare loop: the runtime invoked back to back on a ready tensor, in a process of its own.

``python -m agent.ctl.bench.bare MODEL THREADS`` is what BareChild starts.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def bare_serve(model_path: Path, threads: int) -> None:
    """The bare loop, in its own process: invoke back to back on a ready tensor until SIGTERM.

    Prints ``ready`` once warm; the parent pauses and resumes this process (SIGSTOP/SIGCONT) and
    counts the invokes that ended inside its own windows. On SIGTERM, prints every invoke's end
    time and duration, and the process RSS, as one JSON line.
    """
    from agent.camera import SyntheticSource
    from agent.ctl.bench.minimal import timed_loop
    from agent.inference.loader import load_model
    from agent.runtimes.choice import chooser, probe

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    model = load_model(model_path, chooser(probe(check_runtimes="first"), model_path), threads=threads)
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
    timed_loop(call, stop, session.info.backend, session.info.accelerator)


MINIMAL = Path(__file__).with_name("minimal.py")


class BareChild:
    """A bare loop in a child process, paused and resumed by the parent: ``bare_serve`` (the agent's own
    session settings) or, with ``runtime``, minimal.py (that runtime's defaults, nothing of the agent)."""

    def __init__(self, model_path: Path, threads: int, runtime: str | None = None):
        cmd = ([sys.executable, str(MINIMAL), str(model_path), str(threads), runtime] if runtime else
               [sys.executable, "-m", "agent.ctl.bench.bare", str(model_path), str(threads)])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
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


if __name__ == "__main__":  # the bare child: MODEL THREADS
    bare_serve(Path(sys.argv[1]), int(sys.argv[2]))
