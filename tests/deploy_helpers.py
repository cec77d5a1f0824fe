"""Models and senders for the deployment tests (built from the real bundled models)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from conftest import MODELS, REPO
from onnx import TensorProto, helper, numpy_helper


def ctl(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.ctl", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def copy_model(src: Path, dest_dir: Path, name: str, yaml_text: str | None = None) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / name
    dest.write_bytes(src.read_bytes())
    (dest_dir / "model.yaml").write_text(yaml_text or (MODELS / "model.yaml").read_text())
    return dest


def padded_onnx(dest_dir: Path, megabytes: float) -> Path:
    """BlazeFace ONNX made bigger with a metadata blob: a valid model of any size, for transfer tests."""
    m = onnx.load(str(MODELS / "blazeface.onnx"))
    pad = m.metadata_props.add()
    pad.key, pad.value = "padding", "x" * int(megabytes * 2**20)
    dest_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dest_dir / "big.onnx"))
    (dest_dir / "model.yaml").write_text((MODELS / "model.yaml").read_text())
    return dest_dir / "big.onnx"


def slow_onnx(dest_dir: Path, matmuls: int = 40) -> Path:
    """BlazeFace ONNX plus a heavy branch multiplied by zero: same outputs, many times the latency.

    The branch depends on the input, so the runtime cannot fold it away.
    """
    m = onnx.load(str(MODELS / "blazeface.onnx"))
    g = m.graph
    producer = next(n for n in g.node if "classificators" in n.output)
    producer.output[list(producer.output).index("classificators")] = "cls_raw"
    rng = np.random.default_rng(0)
    g.initializer.append(numpy_helper.from_array(np.array([384, 128], np.int64), "slow_shape"))
    g.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "slow_zero"))
    g.node.append(helper.make_node("Reshape", ["input", "slow_shape"], ["slow_0"]))
    g.initializer.append(numpy_helper.from_array(rng.standard_normal((128, 384)).astype(np.float32) * 0.01, "slow_w0"))
    g.node.append(helper.make_node("MatMul", ["slow_0", "slow_w0"], ["slow_1"]))
    for i in range(1, matmuls):
        g.initializer.append(numpy_helper.from_array(
            rng.standard_normal((384, 384)).astype(np.float32) * 0.05, f"slow_w{i}"))
        g.node.append(helper.make_node("MatMul", [f"slow_{i}", f"slow_w{i}"], [f"slow_{i + 1}"]))
    g.node.append(helper.make_node("ReduceSum", [f"slow_{matmuls}"], ["slow_sum"], keepdims=0))
    g.node.append(helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nil"]))
    g.node.append(helper.make_node("Add", ["cls_raw", "slow_nil"], ["classificators"]))
    onnx.checker.check_model(m)
    dest_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dest_dir / "slow.onnx"))
    (dest_dir / "model.yaml").write_text((MODELS / "model.yaml").read_text())
    return dest_dir / "slow.onnx"


def manifest_for(model: Path, target: dict | None = None, **flags) -> tuple[dict, bytes]:
    """The manifest agent-ctl would send, built by agent-ctl's own code (``target``: its signed target)."""
    from agent.ctl.deploy import build_manifest

    args = argparse.Namespace(task=None, labels=None, name=None, version=None, url=None, no_golden=False,
                              sign_key=None, chunk_kb=96)
    for k, v in flags.items():
        setattr(args, k, v)
    return build_manifest(args, model, target)


def publish_manifest(client, topic: str, raw: dict) -> None:
    client.publish(topic, json.dumps(raw).encode(), qos=1, retain=True).wait_for_publish(5)


def publish_chunks(client, base: str, raw: dict, data: bytes, indices) -> None:
    size = raw["source"]["chunk_size"]
    for i in indices:
        client.publish(f"{base}/{raw['deployment_id']}/chunk/{i}", data[i * size:(i + 1) * size], qos=1)


def hang_on_bright_onnx(dest_dir: Path) -> Path:
    """A raw-task model that answers at once on a dark frame and runs for hours on a bright one.

    Its Loop's trip count is max(input) * 1e9: warm-up on zeros passes, the first bright frame hangs
    the runtime for real, the way a bad model or driver can on a device.
    """
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "spin",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    nodes = [
        helper.make_node("ReduceMax", ["input"], ["mx"], keepdims=0),
        helper.make_node("Mul", ["mx", "big"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trips", "true", "zero"], ["output"], body=body),
    ]
    graph = helper.make_graph(nodes, "hang_on_bright", [x], [y], [
        numpy_helper.from_array(np.array(1e9, np.float32), "big"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
    ])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    dest_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest_dir / "hang.onnx"))
    (dest_dir / "model.yaml").write_text("name: hang-on-bright\nversion: '1'\ntask: raw\n")
    return dest_dir / "hang.onnx"
