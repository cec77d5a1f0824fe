"""The bare loop a user would write: numpy and one runtime, its defaults, a ready tensor, back to back.

Run as a file, not as a module of the package (``python .../minimal.py MODEL THREADS RUNTIME``), so
the process imports numpy and that runtime and nothing of edge-agent: its RSS is the floor the
agent is compared with. RUNTIME is ``onnxruntime`` or a TFLite module (``ai_edge_litert``,
``tflite_runtime``, ``tensorflow.lite``), as the agent's probe picked it. The only setting changed
from the runtime's defaults is the number of threads (the agent's, so both use the same cores).

Protocol as in bare.py: ``ready`` once warm; paused and resumed by the parent; on SIGTERM one JSON
line with every invoke's end time and duration and the process RSS.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import time
from array import array

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def onnx_loop(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
             "tensor(float16)": np.float16}.get(inp.type, np.float32)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    feed = {inp.name: np.random.default_rng(0).random(shape).astype(dtype)}
    return lambda: sess.run(None, feed), "onnxruntime", "cpu"


def tflite_loop(path: str, threads: int, module: str):
    if module == "tensorflow.lite":
        import tensorflow as tf

        interpreter_cls = tf.lite.Interpreter
    else:
        interpreter_cls = importlib.import_module(f"{module}.interpreter").Interpreter
    interp = interpreter_cls(model_path=path, num_threads=threads)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    x = np.random.default_rng(0).random(inp["shape"]).astype(inp["dtype"])
    interp.set_tensor(inp["index"], x)
    outs = [d["index"] for d in interp.get_output_details()]

    def call():
        interp.invoke()
        return [interp.get_tensor(i) for i in outs]

    return call, "tflite", "xnnpack"


def timed_loop(call, stop: list, backend: str, accelerator: str) -> None:
    """Warm ``call`` up, say ``ready``, call it back to back until ``stop`` fills (SIGTERM), print the JSON line."""
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
    print(json.dumps({"ends": ends.tolist(), "durations": durations.tolist(), "rss_mb": _rss_mb(),
                      "backend": backend, "accelerator": accelerator, "modules": sorted(
                          m for m in sys.modules if m.split(".")[0] in ("agent", "cv2", "paho", "pydantic"))}))


def main() -> None:
    path, threads, runtime = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    stop: list = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    call, backend, accelerator = onnx_loop(path, threads) if runtime == "onnxruntime" else \
        tflite_loop(path, threads, runtime)
    timed_loop(call, stop, backend, accelerator)


if __name__ == "__main__":
    main()
