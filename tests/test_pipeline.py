"""The frame loop hands raw outputs on; the publisher's thread checks, decodes and numbers them."""

from __future__ import annotations

import os
import queue
import time

import numpy as np
import pytest
from conftest import ASTRONAUT_FACE, MODELS, astronaut, choose, wait_until

from agent.camera import Frame, FrameSlot
from agent.inference import loaded as model_mod
from agent.inference.loaded import Inferred
from agent.inference.loader import load_model
from agent.inference.pipeline import Pipeline
from agent.runtimes import ModelLoadError, open_session, warm_up


@pytest.mark.parametrize("model_file", ["blazeface.onnx", "blazeface.tflite"])
def test_handed_off_outputs_are_not_overwritten_by_the_next_run(model_file):
    model = load_model(MODELS / model_file, choose)
    face, blank = astronaut(), np.zeros((480, 640, 3), np.uint8)
    first = model.run(face, hand_off=True)
    kept = [o.copy() for o in first.outputs]
    second = model.run(blank, hand_off=True)
    assert all(a is not b for a, b in zip(first.outputs, second.outputs, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(first.outputs, kept, strict=True))
    assert first.results is None  # small outputs: left for the publisher's thread to decode
    assert len(model.decode(first)[0]) == 1 and model.decode(second)[0] == []


def test_outputs_too_large_to_hand_off_are_decoded_on_the_frame_loop(monkeypatch):
    model = load_model(MODELS / "blazeface.onnx", choose)
    monkeypatch.setattr(model_mod, "HAND_OFF_MAX_BYTES", 1024)  # BlazeFace's outputs are 61 KB
    done = model.run(astronaut(), hand_off=True)
    assert done.results is not None and len(done.results) == 1
    assert model.decode(done) == (done.results, done.postprocess_ms)


def test_finish_numbers_predictions_without_gaps_and_counts_bad_outputs_as_errors():
    model = load_model(MODELS / "blazeface.tflite", choose)
    pipe = Pipeline(FrameSlot(), model, lambda done: None)
    good = model.run(astronaut(), hand_off=True)
    nan = Inferred(model, [np.full_like(o, np.nan) for o in good.outputs], good.geom, 0.1, 1.0)
    empty = Inferred(model, [np.zeros((0,), np.float32)], good.geom, 0.1, 1.0)
    got = [pipe.finish(d) for d in (good, nan, good, empty, good)]
    assert [p.seq if p else None for p in got] == [1, None, 2, None, 3]
    assert pipe.stats.output_errors == 2 and pipe.stats.errors == 2
    assert "NaN" in pipe.stats.last_error
    first = got[0]
    assert first.timings.postprocess > 0 and first.timings.inference == good.inference_ms
    assert first.results[0].label == "face"


def test_the_frame_loop_hands_each_frame_on_with_its_capture_time():
    model = load_model(MODELS / "blazeface.onnx", choose)
    slot, out = FrameSlot(), queue.Queue()
    pipe = Pipeline(slot, model, out.put)
    pipe.start()
    try:
        img = np.zeros((480, 640, 3), np.uint8)
        h, w = astronaut().shape[:2]
        img[:h, :w] = astronaut()[:480]
        for i in range(3):
            slot.queue(Frame(img, 1000.0 + i, time.monotonic(), i))
        handed = [out.get(timeout=10) for _ in range(3)]
    finally:
        pipe.stop()
    assert [d.frame_ts for d in handed] == [1000.0, 1001.0, 1002.0]
    assert all(d.ts > 1002.0 and d.results is None for d in handed)
    preds = [pipe.finish(d) for d in handed]
    assert [p.seq for p in preds] == [1, 2, 3]
    box = preds[0].results[0].box
    x1, y1, x2, y2 = (v * s for v, s in zip(box, (640, 480, 640, 480), strict=True))
    assert abs(x1 - ASTRONAUT_FACE[0]) < 20 and abs(y2 - ASTRONAUT_FACE[3]) < 20
    assert pipe.stats.processed == 3 and len(pipe.stats.total_ms) == 3


@pytest.mark.parametrize("model_file", ["blazeface.onnx", "blazeface.tflite"])
def test_warm_up_runs_at_idle_priority_on_a_thread_of_its_own(model_file):
    session = open_session(MODELS / model_file, choose(model_file.rsplit(".", 1)[1]), threads=2, warmup=False)
    real, seen = session.run, []

    def run(inputs):
        seen.append((os.sched_getscheduler(0), inputs[0].shape, float(inputs[0].max())))
        return real(inputs)

    session.run = run
    warm_up(session, 2)
    assert seen == [(os.SCHED_IDLE, session.inputs[0].shape, 0.0)] * 2
    assert os.sched_getscheduler(0) != os.SCHED_IDLE
    # nothing the warm-up touched stays idle: ORT's pool threads were made at load, by the loader,
    # and the warm-up's own thread is gone (a moment after join() returns)
    def idle_threads() -> list[int]:
        return [t for t in map(int, os.listdir("/proc/self/task")) if _policy(t) == os.SCHED_IDLE]

    wait_until(lambda: not idle_threads(), 2, what="no SCHED_IDLE thread left")
    session.run([np.zeros(session.inputs[0].shape, np.float32)])  # the runtime's threads all at work
    assert idle_threads() == []


def _policy(tid: int) -> int | None:
    try:
        return os.sched_getscheduler(tid)
    except OSError:  # the thread ended between listing and asking
        return None


def test_a_model_that_fails_its_warm_up_does_not_load(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # Reshape to a shape the input cannot take: it loads, and fails on its first run.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [7, 5])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    with pytest.raises(ModelLoadError, match="warm-up inference failed"):
        open_session(path, choose("onnx"))


def test_a_frame_prepared_before_a_swap_is_reused_only_when_the_new_model_takes_the_same_input(tmp_path):
    old = load_model(MODELS / "blazeface.tflite", choose)
    new_version = load_model(MODELS / "blazeface.tflite", choose)  # a deploy of the same model
    (tmp_path / "blazeface.tflite").write_bytes((MODELS / "blazeface.tflite").read_bytes())
    manifest = (MODELS / "model.yaml").read_text().replace("mean: [127.5, 127.5, 127.5]", "mean: [0, 0, 0]")
    (tmp_path / "model.yaml").write_text(manifest)
    other_input = load_model(tmp_path / "blazeface.tflite", choose)  # same file, other normalisation
    face = astronaut()

    prepared = old.prepare(face)
    reused = new_version.run(face, prepared)
    assert reused.preprocess_ms == prepared.ms  # not preprocessed again
    fresh = new_version.run(face)
    assert all(np.array_equal(a, b) for a, b in zip(reused.outputs, fresh.outputs, strict=True))

    prepared = old.prepare(face)
    redone = other_input.run(face, prepared)
    assert redone.preprocess_ms != prepared.ms  # preprocessed again, for this model's input
    mine = other_input.run(face)
    assert all(np.array_equal(a, b) for a, b in zip(redone.outputs, mine.outputs, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(redone.outputs, fresh.outputs, strict=True))
