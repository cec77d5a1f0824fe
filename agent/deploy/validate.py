"""Validate a model in a child process: a model that crashes or hangs its runtime kills the child, not us.

Children are forked from a forkserver that imported the runtimes once, so a validation costs a fork,
not a new interpreter (seconds on a Pi). ``python -m agent.deploy.validate MODEL SPEC_JSON`` runs the same
checks in the foreground and prints one JSON line, for debugging a model by hand.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np

from agent.runtimes.isolated import SIGNAL_NAMES


class ValidationFailed(RuntimeError):
    """The model did not pass; the message says what happened."""


_CTX = None
BACKGROUND_NICE = 10
PRELOAD = ["agent.deploy.validate", "agent.inference.loader", "agent.runtimes", "agent.deploy.manifest", "numpy", "cv2"]


def _context():
    """A forkserver that has imported the runtimes once: each validation is a cheap fork, not a new Python."""
    global _CTX
    if _CTX is None:
        from agent.runtimes import registry
        from agent.runtimes.choice import probe

        facts = probe(check_runtimes="first")
        # Each backend's own module (so the children find the registry filled), and the runtime modules
        # each says work here: importing a broken one would print numpy's C-level warnings into the journal.
        runtimes = [m for b in registry.backends() for m in (type(b).__module__, *b.preload(facts))]
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD + runtimes)  # modules that don't import are skipped
        _CTX = ctx
    return _CTX


def _child(model_path: str, spec: dict, conn) -> None:
    import os

    os.nice(BACKGROUND_NICE)  # the live frame loop keeps the CPU; validation can wait
    try:
        result = _check(Path(model_path), spec)
    except Exception as exc:  # noqa: BLE001 - report every failure as data, the parent decides
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    conn.send(result)
    conn.close()


def validate_in_child(model_path: Path, manifest: dict, *, backend: str = "auto", accelerator: str = "auto",
                      timeout: float = 60.0) -> dict:
    """Run the checks below in a child process; ValidationFailed on a failure, a crash or a timeout."""
    ctx = _context()
    spec = {"manifest": manifest, "backend": backend, "accelerator": accelerator}
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(str(model_path), spec, send), name="edge-agent-validate", daemon=True)
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            try:
                result = recv.recv()
            except EOFError:  # the child died before it could answer
                result = None
        else:
            result = None
        proc.join(5 if result is not None else 0.5)
        if proc.is_alive():
            proc.kill()
            proc.join()
            if result is None:
                raise ValidationFailed(f"validation did not finish within {timeout:.0f} s (the model hangs its "
                                       "runtime?); the child was killed")
    finally:
        recv.close()
    if result is None:
        code = proc.exitcode or 0
        if code < 0:
            name = SIGNAL_NAMES.get(-code, str(-code))
            raise ValidationFailed(f"the runtime crashed while loading or running the model (killed by {name})")
        raise ValidationFailed(f"validation exited with code {code} without a result")
    if not result.get("ok"):
        raise ValidationFailed(result.get("error") or "validation failed")
    return result


def _check(model_path: Path, spec: dict) -> dict:
    import cv2

    from agent.deploy.golden import compare_golden
    from agent.deploy.manifest import DeploymentManifest
    from agent.inference.loader import load_model
    from agent.runtimes.choice import chooser, probe

    manifest = DeploymentManifest.model_validate(spec["manifest"])
    choose = chooser(probe(check_runtimes="first"), model_path, spec["backend"], spec["accelerator"])
    model = load_model(model_path, choose, task=manifest.model.task)  # loads, warms up
    info = model.session.info
    frame = np.zeros((240, 320, 3), np.uint8)
    if manifest.golden is not None:
        png = np.frombuffer(base64.b64decode(manifest.golden.frame_png), np.uint8)
        decoded = cv2.imdecode(png, cv2.IMREAD_COLOR)
        if decoded is None:
            return {"ok": False, "error": "golden frame is not a PNG image"}
        frame = decoded
    outputs, geom = model.run_raw(frame)
    for i, out in enumerate(outputs):
        if out.size == 0:
            return {"ok": False, "error": f"output {i} is empty"}
    try:
        model.decoder(outputs, geom)
    except Exception as exc:  # noqa: BLE001 - any decoder error means the outputs don't fit the task
        return {"ok": False, "error": f"the model's outputs do not fit task {manifest.model.task!r}: {exc}"}
    if manifest.golden is not None:
        from agent.runtimes.base import dequantize

        real = [dequantize(o, s) for o, s in zip(outputs, model.session.outputs, strict=True)]
        problem = compare_golden(manifest.golden, real)
        if problem:
            return {"ok": False, "error": f"golden check failed: {problem}"}
    return {"ok": True, "backend": info.backend, "accelerator": info.accelerator,
            "inputs": [list(s.shape) for s in model.session.inputs],
            "outputs": [list(s.shape) for s in model.session.outputs]}


def main() -> int:
    model_path, spec_path = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        result = _check(model_path, json.loads(spec_path.read_text()))
    except Exception as exc:  # noqa: BLE001 - report every failure as data, the parent decides
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
