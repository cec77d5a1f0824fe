#!/usr/bin/env python3
"""Build the deliberately broken model fixtures in ``tests/fixtures/models/``.

edge-agent validates a newly deployed model in a child process before it
activates it, so that a model which crashes or hangs its runtime takes down
the child (or gets it killed on a timeout), never the daemon. Testing that
needs real models that misbehave, and this script makes them:

``hang.onnx``
    A small, *valid* ONNX model (opset 13, input ``input`` float32
    [1, 3, 32, 32], output ``output`` of the same shape). Its graph is a single
    ``Loop`` with a trip count of 2**62 whose body does ``acc = acc * 0.5 + 0.5``.
    ``onnx.checker.check_model(full_check=True)`` passes and onnxruntime (CPU)
    creates the session in milliseconds, but ``session.run`` never returns.

``crash.tflite``
    ``models/face/blazeface.tflite`` with one int32 changed: dimension 1 of
    tensor ``conv2d/Kernel_dequantize`` (tensor 224, the float kernel that a
    DEQUANTIZE makes from the fp16 constant ``conv2d/Kernel``) goes from 5 to
    65536. The flatbuffer still parses (its first 8 bytes, with the ``TFL3``
    identifier, are unchanged), and ``Interpreter(model_path=...)`` works. But
    ``allocate_tensors()`` applies the default XNNPACK delegate, and XNNPACK
    packs the declared [24, 65536, 5, 3] fp16 kernel out of a 3600-byte
    buffer: it reads far past the end and the process dies of SIGSEGV (in
    ``xnn_create_convolution2d_nhwc_f32_f16``). This happens with
    ``ai_edge_litert`` and ``tensorflow.lite``. Without the default delegates
    (``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``) the model loads and
    runs, so the crash needs the default resolver, which is the one edge-agent
    uses.

These are broken test fixtures on purpose. Never deploy them.

Usage::

    python scripts/make_fixture_models.py            # write both files, then check them
    python scripts/make_fixture_models.py --no-check # only write them

The checks run every model in a child process: crash.tflite has to die of
the same signal 5 times out of 5, after a constructor that succeeds, and
hang.onnx has to create its session in under 1 s and still be running 10 s
into ``run``. The script exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "fixtures" / "models"
BLAZEFACE = ROOT / "models" / "face" / "blazeface.tflite"
BLAZEFACE_SHA256 = "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633"  # checked so the mutation lands where intended

# The mutation applied to blazeface.tflite: (tensor name, shape dim, old value, new value).
CRASH_TENSOR = "conv2d/Kernel_dequantize"
CRASH_DIM = 1
CRASH_OLD = 5
CRASH_NEW = 65536
# Where that int32 is in the file we have (computed from the schema below, this is a cross-check).
CRASH_OFFSET = 215948

HANG_TRIP_COUNT = 2**62


# --------------------------------------------------------------------------- hang.onnx


def build_hang_onnx() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    shape = [1, 3, 32, 32]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Mul", ["acc_in", "half"], ["scaled"]),
            helper.make_node("Add", ["scaled", "half"], ["acc_out"]),
        ],
        "hang_body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, shape),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, shape),
        ],
        initializer=[helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip_count", "keep_going", "input"], ["output"], body=body)],
        "hang",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        initializer=[
            helper.make_tensor("trip_count", TensorProto.INT64, [], [HANG_TRIP_COUNT]),
            helper.make_tensor("keep_going", TensorProto.BOOL, [], [True]),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13)],
        producer_name="edge-agent scripts/make_fixture_models.py",
        doc_string="Deliberately broken test fixture: inference never finishes. Do not deploy.",
    )
    model.ir_version = 8  # loadable by any onnxruntime >= 1.10
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


# --------------------------------------------------------------------------- crash.tflite


def _shape_dim_offset(data: bytes, tensor_name: str, dim: int) -> int:
    """Byte offset of ``shape[dim]`` of the named tensor of subgraph 0."""
    import flatbuffers

    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover - fall back to TensorFlow's copy
        from tensorflow.lite.python import schema_py_generated as schema

    subgraph = schema.Model.GetRootAsModel(data, 0).Subgraphs(0)
    for i in range(subgraph.TensorsLength()):
        tensor = subgraph.Tensors(i)
        if tensor.Name().decode() == tensor_name:
            tab = tensor._tab
            field = flatbuffers.number_types.UOffsetTFlags.py_type(tab.Offset(4))  # Tensor.shape
            if not field or dim >= tab.VectorLen(field):
                raise SystemExit(f"{tensor_name} has no shape[{dim}]")
            return tab.Vector(field) + 4 * dim
    raise SystemExit(f"no tensor {tensor_name!r} in {BLAZEFACE}")


def build_crash_tflite() -> bytes:
    data = BLAZEFACE.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != BLAZEFACE_SHA256:
        raise SystemExit(f"{BLAZEFACE} changed (sha256 {digest}); re-derive the mutation")
    offset = _shape_dim_offset(data, CRASH_TENSOR, CRASH_DIM)
    if offset != CRASH_OFFSET:
        raise SystemExit(f"shape field at {offset}, expected {CRASH_OFFSET}")
    (old,) = struct.unpack_from("<i", data, offset)
    if old != CRASH_OLD:
        raise SystemExit(f"{CRASH_TENSOR}.shape[{CRASH_DIM}] is {old}, expected {CRASH_OLD}")
    out = bytearray(data)
    struct.pack_into("<i", out, offset, CRASH_NEW)
    assert out[:8] == data[:8] and out[4:8] == b"TFL3"
    return bytes(out)


# --------------------------------------------------------------------------- checks

_TFLITE_CHILD = r"""
import sys, numpy as np
module, path = sys.argv[1], sys.argv[2]
if module == "tensorflow.lite":
    import tensorflow as tf
    Interpreter = tf.lite.Interpreter
else:
    import importlib
    Interpreter = importlib.import_module(module + ".interpreter").Interpreter
interp = Interpreter(model_path=path)
print("STAGE constructed", flush=True)
interp.allocate_tensors()
print("STAGE allocated", flush=True)
for d in interp.get_input_details():
    interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
interp.invoke()
print("STAGE invoked", flush=True)
"""

_ONNX_CHILD = r"""
import sys, time, numpy as np, onnxruntime as ort
t = time.monotonic()
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print("SESSION %.3f" % (time.monotonic() - t), flush=True)
sess.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})
print("RETURNED", flush=True)
"""


def _signame(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def check_crash(path: Path, module: str = "ai_edge_litert", runs: int = 5) -> bool:
    results = []
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-c", _TFLITE_CHILD, module, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        stages = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("STAGE ")]
        results.append((proc.returncode, stages[-1] if stages else "none"))
    print(f"crash.tflite with {module}: {results}")
    rcs = {rc for rc, _ in results}
    ok = len(rcs) == 1 and next(iter(rcs)) < 0
    if ok:
        rc, last = results[0]
        where = {"none": "constructor", "constructed": "allocate_tensors", "allocated": "invoke"}.get(last, last)
        print(f"  OK: killed by {_signame(rc)} ({-rc}) in {where}, {runs}/{runs} runs")
    else:
        print("  FAIL: expected the same signal death every run")
    return ok


def check_hang(path: Path, wait_s: float = 10.0) -> bool:
    proc = subprocess.Popen(
        [sys.executable, "-c", _ONNX_CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        first = proc.stdout.readline().split()  # SESSION <seconds>
        session_s = float(first[1]) if first and first[0] == "SESSION" else None
        t = time.monotonic()
        try:
            proc.wait(timeout=wait_s)
            print(f"hang.onnx: child exited with {proc.returncode} after {time.monotonic() - t:.1f} s")
            return False
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ok = session_s is not None and session_s < 1.0
    print(f"hang.onnx: session created in {session_s} s; run still going after {wait_s:.0f} s (killed)")
    print("  OK" if ok else "  FAIL: session creation did not succeed in under 1 s")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-check", action="store_true", help="only write the files")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    hang, crash = args.out / "hang.onnx", args.out / "crash.tflite"
    hang.write_bytes(build_hang_onnx())
    crash.write_bytes(build_crash_tflite())
    for p in (hang, crash):
        print(f"wrote {p} ({p.stat().st_size} bytes, sha256 {hashlib.sha256(p.read_bytes()).hexdigest()})")
    if args.no_check:
        return 0
    ok = check_crash(crash)
    ok = check_hang(hang) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
