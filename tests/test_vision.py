"""Preprocessing, model loading and BlazeFace decoding on real models and a real photo."""

from __future__ import annotations

import gc
import shutil
import threading
import weakref
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ASTRONAUT_FACE, MODELS, astronaut, choose

from agent.daemon.main import freeze_startup_objects
from agent.inference.loader import load_model
from agent.inference.modelfile import read_labels
from agent.runtimes import ModelLoadError, detect_format
from agent.runtimes import choice as probe
from agent.runtimes.base import TensorSpec
from agent.runtimes.onnx import OnnxSession
from agent.runtimes.tflite import TFLiteSession, embedded_labels
from agent.vision.geometry import Geometry
from agent.vision.preprocess import Preprocessor, PreprocessSpec
from agent.vision.tasks.blazeface import anchors


def iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("model_file", ["blazeface.tflite", "blazeface.onnx"])
def test_blazeface_finds_the_astronauts_face_on_both_backends(model_file):
    model = load_model(MODELS / model_file, choose)
    img = astronaut()
    results, timings = model.infer(img)
    assert len(results) == 1
    face = results[0]
    assert face.label == "face" and face.score > 0.85
    expected = tuple(v / 512 for v in ASTRONAUT_FACE)
    assert iou(face.box, expected) > 0.9
    # keypoints: right eye left of left eye (in the image), nose below both eyes, all inside the box
    (rx, ry), (lx, ly), (nx, ny) = face.keypoints[:3]
    assert rx < lx and ny > max(ry, ly)
    assert all(face.box[0] <= x <= face.box[2] and face.box[1] <= y <= face.box[3] for x, y in face.keypoints[:4])
    assert timings.inference > 0 and timings.total >= timings.inference
    model.close()


def test_both_backends_agree_on_the_same_frame():
    img = astronaut()
    a = load_model(MODELS / "blazeface.tflite", choose).infer(img)[0][0]
    b = load_model(MODELS / "blazeface.onnx", choose).infer(img)[0][0]
    assert np.allclose(a.box, b.box, atol=1e-3) and abs(a.score - b.score) < 1e-3


def test_letterboxed_frame_maps_boxes_back_to_the_original_frame():
    # A 3:2 frame letterboxed into the square input: the face must stay big enough for the
    # short-range model (it is made for faces within ~2 m), so use a crop around the face.
    canvas = np.full((320, 480, 3), 60, np.uint8)
    canvas[:, 80:400] = astronaut()[0:320, 64:384]
    model = load_model(MODELS / "blazeface.tflite", choose)
    model.preprocessor = Preprocessor(model.session.inputs[0], PreprocessSpec(
        resize="letterbox", mean=(127.5,) * 3, std=(127.5,) * 3))
    faces = model.infer(canvas)[0]
    x1, y1, x2, y2 = ASTRONAUT_FACE
    expected = ((x1 - 64 + 80) / 480, y1 / 320, (x2 - 64 + 80) / 480, y2 / 320)
    assert len(faces) == 1 and iou(faces[0].box, expected) > 0.75, (faces, expected)


@pytest.mark.parametrize("model_file", ["blazeface.tflite", "blazeface.onnx"])
def test_a_model_frozen_with_the_daemons_start_up_objects_is_freed_when_replaced(model_file):
    # The daemon freezes what start-up made, its first model included (gc.freeze: a full collection then
    # skips it instead of walking it with the GIL held). Frozen objects are never collected, so the
    # first model must be freed by reference counting alone when a deploy replaces it: no cycles.
    model = load_model(MODELS / model_file, choose)
    model.infer(astronaut())
    runtime = model.session.ort if model_file.endswith(".onnx") else model.session._interp
    refs = {name: weakref.ref(obj) for name, obj in
            (("model", model), ("session", model.session), ("runtime", runtime), ("decoder", model.decoder))}
    del runtime
    try:
        assert freeze_startup_objects() > 1000
        model.close()
        del model
        assert [name for name, ref in refs.items() if ref() is not None] == []
    finally:
        gc.unfreeze()


def test_no_face_in_a_photo_without_one():
    import skimage

    cup = cv2.imread(str(Path(skimage.__file__).parent / "data" / "coffee.png"))
    assert load_model(MODELS / "blazeface.tflite", choose).infer(cup)[0] == []


def test_anchor_grid_matches_the_model_output_count():
    a = anchors(128)
    assert a.shape == (896, 2)
    assert np.allclose(a[0], [0.5 / 16, 0.5 / 16]) and np.allclose(a[-1], [7.5 / 8, 7.5 / 8])


def test_preprocess_nchw_float_normalisation_and_layout():
    spec = TensorSpec("x", (1, 3, 4, 6), np.dtype(np.float32))
    pre = Preprocessor(spec, PreprocessSpec(mean=(0, 0, 0), std=(255, 255, 255)))
    frame = np.zeros((8, 12, 3), np.uint8)
    frame[..., 2] = 255  # red in BGR
    out, geom = pre(frame)
    assert out.shape == (1, 3, 4, 6) and out.dtype == np.float32
    assert np.allclose(out[0, 0], 1.0) and np.allclose(out[0, 1:], 0.0)  # RGB order: channel 0 is red
    assert geom == Geometry.stretch(12, 8, 6, 4)


def test_preprocess_uint8_quantised_input_uses_scale_and_zero_point():
    # an int8 model whose real input is [-1, 1]: q = (x/127.5 - 1) / (1/128) + 0
    spec = TensorSpec("x", (1, 2, 2, 3), np.dtype(np.int8), scale=1 / 128, zero_point=0)
    pre = Preprocessor(spec, PreprocessSpec(mean=(127.5,) * 3, std=(127.5,) * 3))
    out, _ = pre(np.full((2, 2, 3), 255, np.uint8))
    assert out.dtype == np.int8 and (out == 127).all()  # 128 clipped to int8's 127
    out, _ = pre(np.zeros((2, 2, 3), np.uint8))
    assert (out == -128).all()


def test_preprocess_plain_uint8_input_gets_raw_pixels_without_conversion():
    spec = TensorSpec("x", (1, 2, 2, 3), np.dtype(np.uint8), scale=0.0078125, zero_point=128)
    pre = Preprocessor(spec, PreprocessSpec(mean=(127.5,) * 3, std=(127.5,) * 3))
    out, _ = pre(np.full((2, 2, 3), 200, np.uint8))
    assert out.dtype == np.uint8 and abs(int(out[0, 0, 0, 0]) - 200) <= 1  # (200/127.5-1)*128+128 = 200.8


def test_letterbox_geometry_round_trip():
    g = Geometry.letterbox(640, 480, 640, 640)
    assert (g.pad_x, g.pad_y) == (0, 80)
    assert np.allclose(g.box_to_frame(0, 80 / 640, 1, 560 / 640), (0, 0, 1, 1))


def test_format_is_read_from_the_first_bytes_not_the_name(tmp_path: Path):
    disguised = tmp_path / "model.bin"
    shutil.copyfile(MODELS / "blazeface.onnx", disguised)
    assert detect_format(MODELS / "blazeface.tflite") == "tflite"
    assert detect_format(disguised) == "onnx"
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ValueError, match="not a TFLite"):
        detect_format(junk)


def test_truncated_tflite_model_fails_to_load_with_a_clear_error(tmp_path: Path):
    bad = tmp_path / "cut.tflite"
    bad.write_bytes((MODELS / "blazeface.tflite").read_bytes()[:5000])
    with pytest.raises((ModelLoadError, Exception)) as exc:
        load_model(bad, choose)
    assert "cut.tflite" in str(exc.value) or "TFLite" in str(exc.value)


def test_labels_embedded_in_tflite_metadata_are_read(tmp_path: Path):
    # TFLite metadata packs associated files as a zip appended to the flatbuffer.
    model = tmp_path / "with_labels.tflite"
    shutil.copyfile(MODELS / "blazeface.tflite", model)
    with zipfile.ZipFile(model, "a") as zf:
        zf.writestr("labelmap.txt", "person\nface\n")
    assert embedded_labels(model) == ("person", "face")
    assert TFLiteSession(model).inputs[0].shape == (1, 128, 128, 3)  # still a valid model
    assert embedded_labels(MODELS / "blazeface.tflite") == ()


def test_label_files_accept_plain_and_numbered_lines(tmp_path: Path):
    f = tmp_path / "labels.txt"
    f.write_text("background\n1 person\n2: bicycle\n\ntraffic light\n")
    assert read_labels(f) == ("background", "person", "bicycle", "traffic light")


def test_onnx_session_reports_a_provider_it_could_not_load():
    s = OnnxSession(MODELS / "blazeface.onnx", providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert s.info.accelerator == "cpu"
    assert s.info.notes and "CUDAExecutionProvider" in s.info.notes[0]
    assert s.info.providers == ("CPUExecutionProvider",)


def test_tflite_falls_through_a_runtime_that_imports_but_cannot_build_an_interpreter():
    # tflite-runtime 2.14 (installed with the test extras) is built for numpy 1.x: under numpy 2 it
    # imports, then fails when the interpreter is created. The probe must fall through to the next.
    if np.lib.NumpyVersion(np.__version__) < "2.0.0":
        pytest.skip("numpy 1.x: tflite_runtime works here, nothing to fall through")
    facts = probe.probe(check_runtimes=True)
    tr = facts.runtimes["tflite_runtime"]
    assert tr.available is False and "numpy" in (tr.error or "")
    choice = probe.choose_runtime(facts, "tflite")
    assert choice.module == "ai_edge_litert"
    s = TFLiteSession(MODELS / "blazeface.tflite")  # no module pinned: the session falls through too
    assert s.info.module == "ai_edge_litert"


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "crop"])
@pytest.mark.parametrize("shape", [(1, 96, 128, 3), (1, 3, 96, 128), (1, 64, 64, 3), (1, 3, 64, 64)])
@pytest.mark.parametrize("color", ["rgb", "bgr"])
def test_fast_and_general_preprocessing_paths_give_the_same_tensor(resize, shape, color):
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    spec = PreprocessSpec(resize=resize, color=color, mean=(10, 20, 30), std=(2, 4, 8))
    fast = Preprocessor(TensorSpec("x", shape, np.dtype(np.float32)), spec)
    general = Preprocessor(TensorSpec("x", shape, np.dtype(np.float32)), spec)
    general._fast = False
    a, ga = fast(frame)
    b, gb = general(frame)
    assert ga == gb
    assert np.abs(a - b).max() < 1e-4
    # written into a buffer the caller gives (a pooled tensor, the interpreter's own input)
    out = np.full(fast.shape, np.nan, np.float32)
    assert fast(frame, out)[0] is out and np.array_equal(out, a)


def test_preprocessing_on_two_threads_at_once_gives_each_its_own_tensor():
    # Right after a swap the frame loop may redo a frame while the capture thread prepares the next.
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(2)]
    pre = Preprocessor(TensorSpec("x", (1, 3, 224, 224), np.dtype(np.float32)), PreprocessSpec(resize="letterbox"))
    want = [pre(f)[0].copy() for f in frames]
    bad = []

    def work(i: int) -> None:
        out = np.empty(pre.shape, np.float32)
        for _ in range(200):
            if not np.array_equal(pre(frames[i], out)[0], want[i]):
                bad.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_onnx_io_binding_gives_the_plain_run_values_in_buffers_it_reuses():
    s = OnnxSession(MODELS / "blazeface.onnx")
    tensor, _ = load_model(MODELS / "blazeface.onnx", choose).preprocessor(astronaut())
    plain = s.ort.run(None, {s.inputs[0].name: tensor})
    first = s.run([tensor])
    assert [o.shape for o in first] == [o.shape for o in plain]
    assert all(np.array_equal(a, b) for a, b in zip(first, plain, strict=True))
    kept = [o.copy() for o in first]
    second = s.run([np.zeros_like(tensor)])
    assert all(a is b for a, b in zip(first, second, strict=True))  # written in place, nothing allocated
    assert not np.array_equal(second[0], kept[0])
    # a non-contiguous or wrongly typed input is converted, not misread
    again = s.run([np.asfortranarray(tensor.astype(np.float64))])
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(again, plain, strict=True))


def test_onnx_model_with_dynamic_output_shape_runs_without_binding(tmp_path: Path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "h", "w"])])
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    s = OnnxSession(path)
    x = np.linspace(-1, 1, 3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5)
    out = s.run([x])
    assert out[0].shape == (1, 3, 4, 5) and np.array_equal(out[0], np.maximum(x, 0))
    assert s.run([x[:, :, :2]])[0].shape == (1, 3, 2, 5)


def test_a_stem_yaml_that_is_not_a_model_yaml_is_passed_over(tmp_path: Path):
    # Ultralytics ships its architecture as yolov8n.yaml beside yolov8n.onnx: not ours, so model.yaml speaks
    shutil.copyfile(MODELS / "blazeface.onnx", tmp_path / "net.onnx")
    (tmp_path / "net.yaml").write_text("nc: 80\nscales:\n  n: [0.33, 0.25, 1024]\nbackbone: [[-1, 1, Conv, [64, 3, 2]]]\n")
    shutil.copyfile(MODELS / "model.yaml", tmp_path / "model.yaml")
    model = load_model(tmp_path / "net.onnx", choose)
    assert model.info.task == "blazeface" and model.info.name == "blazeface-short-range"
    # one of model.yaml's keys makes it ours again, and then a typo in it is reported, not skipped
    (tmp_path / "net.yaml").write_text("task: blazeface\nlabelz: [face]\n")
    with pytest.raises(ValueError, match=r"net.yaml: labelz: Extra inputs are not permitted"):
        load_model(tmp_path / "net.onnx", choose)
