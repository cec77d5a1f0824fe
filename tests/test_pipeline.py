"""The frame loop hands raw outputs on; the publisher's thread checks, decodes and numbers them."""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
from conftest import ASTRONAUT_FACE, MODELS, astronaut

from agent import model as model_mod
from agent import probe
from agent.camera import Frame, FrameSlot
from agent.model import Inferred, load_model
from agent.pipeline import Pipeline


def choose(fmt: str) -> probe.RuntimeChoice:
    return probe.choose_runtime(probe.probe(check_runtimes="first"), fmt)


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
