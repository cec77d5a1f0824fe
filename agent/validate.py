"""Validate a model in a child process: a model that crashes or hangs its runtime kills the child, not us.

Parent side: ``validate_in_child``. Child side: ``python -m agent.validate MODEL MANIFEST_JSON``, which
prints one JSON line: {"ok": true, ...} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

SIGNAL_NAMES = {s.value: s.name for s in signal.Signals}


class ValidationFailed(RuntimeError):
    """The model did not pass; the message says what happened."""


def validate_in_child(model_path: Path, manifest: dict, *, backend: str = "auto", accelerator: str = "auto",
                      timeout: float = 60.0, workdir: Path | None = None) -> dict:
    """Run the checks below in a fresh interpreter; ValidationFailed on a failure, a crash or a timeout."""
    spec = workdir / "validate.json" if workdir else model_path.with_suffix(".validate.json")
    spec.write_text(json.dumps({"manifest": manifest, "backend": backend, "accelerator": accelerator}))
    try:
        proc = subprocess.run([sys.executable, "-m", "agent.validate", str(model_path), str(spec)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONFAULTHANDLER": ""}, cwd=Path(__file__).parent.parent)
    except subprocess.TimeoutExpired:
        raise ValidationFailed(f"validation did not finish within {timeout:.0f} s (the model hangs its runtime?); "
                               "the child was killed") from None
    finally:
        spec.unlink(missing_ok=True)
    if proc.returncode < 0:
        name = SIGNAL_NAMES.get(-proc.returncode, str(-proc.returncode))
        raise ValidationFailed(f"the runtime crashed while loading or running the model (killed by {name})")
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    try:
        result = json.loads(last)
    except ValueError:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValidationFailed(f"validation exited with code {proc.returncode}: {tail}") from None
    if not result.get("ok"):
        raise ValidationFailed(result.get("error") or "validation failed")
    return result


def _check(model_path: Path, spec: dict) -> dict:
    import cv2

    from agent import probe
    from agent.manifest import DeploymentManifest, compare_golden
    from agent.model import load_model

    manifest = DeploymentManifest.model_validate(spec["manifest"])
    facts = probe.probe(check_runtimes="first")

    def choose(fmt: str):
        return probe.choose_runtime(facts, fmt, spec["backend"], spec["accelerator"],
                                    model_is_edgetpu=probe.is_edgetpu_model(model_path))

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
