"""Contracts of the output decoders: classification, SSD, YOLO, raw, NMS and Ultralytics metadata."""

from __future__ import annotations

import numpy as np
import pytest

from agent.runtimes.base import TensorSpec
from agent.vision.geometry import Geometry
from agent.vision.nms import nms
from agent.vision.params import DecodeParams
from agent.vision.tasks.classification import decode_classification
from agent.vision.tasks.raw import decode_raw
from agent.vision.tasks.ssd import decode_ssd
from agent.vision.tasks.yolo import decode_yolo, yolo_layout_of, yolo_meta

COCO_80 = tuple(f"class{i}" for i in range(80))


def spec(name: str, shape: tuple[int, ...], dtype=np.float32, scale: float = 0.0, zp: int = 0) -> TensorSpec:
    return TensorSpec(name, shape, np.dtype(dtype), scale, zp)


def specs_for(outputs: list[np.ndarray], names: list[str] | None = None) -> list[TensorSpec]:
    names = names or [f"out{i}" for i in range(len(outputs))]
    return [spec(n, o.shape, o.dtype) for n, o in zip(names, outputs, strict=True)]


def approx_box(actual, expected, tol: float = 1e-3) -> None:
    assert actual == pytest.approx(expected, abs=tol)


# ----------------------------------------------------------------------------- NMS


def test_nms_matches_hand_computed_case():
    # A contains B: IoU 64/100 = 0.64. C is disjoint. D overlaps A with IoU 25/175 = 0.14, B with 25/139.
    boxes = np.array([[0, 0, 10, 10], [2, 2, 10, 10], [20, 20, 30, 30], [5, 5, 15, 15]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    assert nms(boxes, scores, 0.5, 10).tolist() == [0, 2, 3]
    assert nms(boxes, scores, 0.1, 10).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7, 10).tolist() == [0, 1, 2, 3]


def test_nms_returns_highest_scores_first_and_respects_max_out():
    boxes = np.array([[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]], dtype=np.float32)
    scores = np.array([0.2, 0.9, 0.5], dtype=np.float32)
    assert nms(boxes, scores, 0.5, 2).tolist() == [1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5, 5).tolist() == []


def test_nms_agrees_with_a_brute_force_reference():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (200, 2))
    boxes = np.hstack([xy, xy + rng.uniform(1, 20, (200, 2))]).astype(np.float32)
    scores = rng.permutation(200).astype(np.float32)

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    expected: list[int] = []
    for i in np.argsort(-scores):
        if all(iou(boxes[i], boxes[j]) <= 0.45 for j in expected):
            expected.append(int(i))
    assert nms(boxes, scores, 0.45, 1000).tolist() == expected


# ----------------------------------------------------------------------------- classification


def test_classification_softmaxes_logits():
    logits = np.array([[1.0, 3.0, -2.0, 0.5]], dtype=np.float32)
    out = decode_classification([logits], [spec("logits", (1, 4))], DecodeParams(top_k=4, threshold=0.0))
    e = np.exp(logits[0] - logits[0].max())
    expected = e / e.sum()
    assert [c.index for c in out] == [1, 0, 3, 2]
    assert [c.score for c in out] == pytest.approx(sorted(expected, reverse=True), abs=1e-6)
    assert sum(c.score for c in out) == pytest.approx(1.0, abs=1e-6)


def test_classification_leaves_probabilities_alone():
    probs = np.array([[0.1, 0.6, 0.3]], dtype=np.float32)
    out = decode_classification([probs], [spec("p", (1, 3))], DecodeParams(top_k=3, threshold=0.0))
    assert [(c.index, c.score) for c in out] == [
        (1, pytest.approx(0.6)),
        (2, pytest.approx(0.3)),
        (0, pytest.approx(0.1)),
    ]


def test_classification_softmax_is_numerically_stable_for_huge_logits():
    logits = np.array([[1000.0, 999.0, -1000.0]], dtype=np.float32)
    out = decode_classification([logits], [spec("l", (1, 3))], DecodeParams(top_k=1))
    assert out[0].index == 0 and np.isfinite(out[0].score)
    assert out[0].score == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-5)


def test_classification_top_k_order_and_labels_with_background_class():
    # 1001-class ImageNet-style output: index 0 is "background", so label i+1 is ImageNet class i.
    labels = ("background", "tench", "goldfish", "great white shark")
    probs = np.zeros((1, 1001), dtype=np.float32)
    probs[0, [1, 2, 3, 500]] = [0.2, 0.5, 0.25, 0.05]
    out = decode_classification(
        [probs], [spec("p", (1, 1001))], DecodeParams(labels=labels, top_k=3, threshold=0.0)
    )
    assert [(c.label, c.index) for c in out] == [("goldfish", 2), ("great white shark", 3), ("tench", 1)]
    # Indices past the label file are named by number.
    out = decode_classification(
        [probs], [spec("p", (1, 1001))], DecodeParams(labels=labels, top_k=4, threshold=0.0)
    )
    assert out[-1].label == "500"


def test_classification_drops_below_threshold_but_always_keeps_the_best():
    probs = np.array([[0.3, 0.25, 0.45]], dtype=np.float32)
    out = decode_classification([probs], [spec("p", (1, 3))], DecodeParams(top_k=3, threshold=0.28))
    assert [c.index for c in out] == [2, 0]
    out = decode_classification([probs], [spec("p", (1, 3))], DecodeParams(top_k=3, threshold=0.9))
    assert [c.index for c in out] == [2]


def test_classification_squeezes_extra_unit_dims():
    probs = np.array([0.1, 0.7, 0.2], dtype=np.float32).reshape(1, 1, 1, 3)
    out = decode_classification([probs], [spec("p", (1, 1, 1, 3))], DecodeParams(top_k=1))
    assert out[0].index == 1


def test_classification_dequantizes_uint8_output():
    # A quantised softmax: scale 1/256, zero point 0, so q=128 means 0.5.
    q = np.zeros((1, 1001), dtype=np.uint8)
    q[0, 7] = 128
    q[0, 9] = 96
    q[0, 11] = 31
    s = spec("q", (1, 1001), np.uint8, scale=1 / 256, zp=0)
    out = decode_classification([q], [s], DecodeParams(top_k=3, threshold=0.0))
    assert [(c.index, c.score) for c in out] == [(7, 0.5), (9, 0.375), (11, pytest.approx(31 / 256))]


def test_classification_int8_logits_are_dequantized_then_softmaxed():
    q = np.array([[-20, 40, 0]], dtype=np.int8)
    s = spec("q", (1, 3), np.int8, scale=0.1, zp=0)
    out = decode_classification([q], [s], DecodeParams(top_k=1))
    e = np.exp(np.array([-2.0, 4.0, 0.0]) - 4.0)
    assert out[0].index == 1 and out[0].score == pytest.approx(e[1] / e.sum(), abs=1e-5)


# ----------------------------------------------------------------------------- SSD

SSD_LABELS = ("person", "bicycle", "car")


def ssd_tensors():
    """Three detections of which two pass 0.5; slots past count hold garbage that must be ignored."""
    boxes = np.zeros((1, 10, 4), dtype=np.float32)
    boxes[0, 0] = [0.1, 0.2, 0.5, 0.6]  # ymin, xmin, ymax, xmax
    boxes[0, 1] = [0.3, 0.3, 0.9, 0.8]
    boxes[0, 2] = [0.0, 0.0, 0.2, 0.2]
    boxes[0, 3] = [0.4, 0.4, 0.6, 0.6]  # beyond count
    classes = np.array([[2, 0, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    scores = np.array([[0.91, 0.77, 0.31, 0.99, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    count = np.array([3], dtype=np.float32)
    return boxes, classes, scores, count


def test_ssd_tf1_and_tf2_output_orders_give_the_same_detections():
    boxes, classes, scores, count = ssd_tensors()
    geom = Geometry.stretch(640, 480, 300, 300)
    params = DecodeParams(labels=SSD_LABELS)
    tf1 = [boxes, classes, scores, count]
    tf2 = [scores, boxes, count, classes]
    a = decode_ssd(tf1, specs_for(tf1), geom, params)
    b = decode_ssd(tf2, specs_for(tf2), geom, params)
    assert a == b
    assert [(d.label, d.index) for d in a] == [("car", 2), ("person", 0)]
    assert [d.score for d in a] == pytest.approx([0.91, 0.77])
    # Stretch geometry is identity on normalised coords; yx order is swapped to xy.
    approx_box(a[0].box, (0.2, 0.1, 0.6, 0.5))


def test_ssd_boxes_are_mapped_back_through_letterbox():
    geom = Geometry.letterbox(640, 480, 300, 300)
    s = 300 / 640  # 0.46875: frame rows 0..480 occupy model rows 37..262 (pad_y 37)
    assert (geom.pad_x, geom.pad_y) == (0, 37)
    frame_box = (0.25, 0.2, 0.75, 0.6)  # x1, y1, x2, y2 normalised to the frame

    def to_model_y(fy: float) -> float:
        return (fy * 480 * s + 37) / 300

    boxes = np.zeros((1, 4, 4), dtype=np.float32)
    boxes[0, 0] = [to_model_y(0.2), 0.25, to_model_y(0.6), 0.75]
    outs = [
        boxes,
        np.zeros((1, 4), np.float32),
        np.array([[0.8, 0, 0, 0]], np.float32),
        np.array([1.0], np.float32),
    ]
    dets = decode_ssd(outs, specs_for(outs), geom, DecodeParams(labels=SSD_LABELS))
    assert len(dets) == 1 and dets[0].label == "person"
    approx_box(dets[0].box, frame_box)


def test_ssd_ambiguous_whole_valued_scores_fall_back_to_names_then_tf1_order():
    boxes, _, _, count = ssd_tensors()
    classes = np.array([[2, 1, 0] + [0] * 7], dtype=np.float32)
    scores = np.array([[1, 1, 0] + [0] * 7], dtype=np.float32)  # whole numbers: content can't tell
    geom = Geometry.stretch(300, 300, 300, 300)
    params = DecodeParams(labels=SSD_LABELS)
    named = [scores, boxes, count, classes]
    dets = decode_ssd(
        named, specs_for(named, ["det_scores", "det_boxes", "num", "det_classes"]), geom, params
    )
    assert [d.label for d in dets] == ["car", "bicycle"]
    tf1 = [boxes, classes, scores, count]
    dets = decode_ssd(tf1, specs_for(tf1, ["a", "b", "c", "d"]), geom, params)
    assert [d.label for d in dets] == ["car", "bicycle"]


def test_ssd_keeps_label_file_placeholders_and_names_unknown_ids_by_number():
    boxes, classes, scores, count = ssd_tensors()
    classes = classes.copy()
    classes[0, :2] = [12, 95]
    outs = [boxes, classes, scores, count]
    labels = tuple(["???" if i == 12 else f"c{i}" for i in range(91)])
    dets = decode_ssd(
        outs, specs_for(outs), Geometry.stretch(300, 300, 300, 300), DecodeParams(labels=labels)
    )
    assert [d.label for d in dets] == ["???", "95"]


def test_ssd_respects_max_detections_and_zero_count():
    boxes, classes, scores, count = ssd_tensors()
    geom = Geometry.stretch(300, 300, 300, 300)
    outs = [boxes, classes, scores, count]
    assert len(decode_ssd(outs, specs_for(outs), geom, DecodeParams(max_detections=1))) == 1
    outs = [boxes, classes, scores, np.array([0.0], np.float32)]
    assert decode_ssd(outs, specs_for(outs), geom, DecodeParams()) == []


# ----------------------------------------------------------------------------- YOLO

LETTERBOX_640x480_IN_640 = Geometry.letterbox(640, 480, 640, 640)  # scale 1, pad_y 80
# Planted box in model pixels (cx, cy, w, h) = (320, 320, 128, 96) -> x 256..384, y 272..368,
# which in the frame is x 256..384 of 640 and y 192..288 of 480.
PLANT_CXCYWH = (320.0, 320.0, 128.0, 96.0)
PLANT_FRAME_BOX = (0.4, 0.4, 0.6, 0.6)


def v8_output(n: int = 100, nc: int = 80, cls: int = 17) -> np.ndarray:
    """A (1, 4+nc, n) v8 head of low-score noise with one strong box of class ``cls`` planted at column 42."""
    rng = np.random.default_rng(1)
    out = np.zeros((1, 4 + nc, n), dtype=np.float32)
    out[0, :4] = rng.uniform(0, 640, (4, n))
    out[0, 4:] = rng.uniform(0, 0.2, (nc, n))
    out[0, :4, 42] = PLANT_CXCYWH
    out[0, 4 + cls, 42] = 0.93
    return out


def v5_output(n: int = 100, nc: int = 80) -> np.ndarray:
    """A (1, n, 5+nc) v5 head with one box planted at row 7: objectness 0.9 x class-3 score 0.8."""
    rng = np.random.default_rng(2)
    out = np.zeros((1, n, 5 + nc), dtype=np.float32)
    out[0, :, :4] = rng.uniform(0, 640, (n, 4))
    out[0, :, 4] = rng.uniform(0, 0.3, n)
    out[0, :, 5:] = rng.uniform(0, 1, (n, nc))
    out[0, 7, :4] = PLANT_CXCYWH
    out[0, 7, 4] = 0.9
    out[0, 7, 5:] = 0.1
    out[0, 7, 5 + 3] = 0.8
    return out


def test_yolo_v8_boxes_are_mapped_back_through_letterbox():
    out = v8_output()
    dets = decode_yolo([out], specs_for([out]), LETTERBOX_640x480_IN_640, DecodeParams(labels=COCO_80))
    assert len(dets) == 1
    assert (dets[0].label, dets[0].index) == ("class17", 17)
    assert dets[0].score == pytest.approx(0.93)
    approx_box(dets[0].box, PLANT_FRAME_BOX)


def test_yolo_v8_transposed_layout_gives_the_same_detections():
    out = v8_output()
    transposed = np.ascontiguousarray(out.transpose(0, 2, 1))  # (1, 100, 84)
    geom = LETTERBOX_640x480_IN_640
    a = decode_yolo([out], specs_for([out]), geom, DecodeParams(labels=COCO_80))
    b = decode_yolo([transposed], specs_for([transposed]), geom, DecodeParams(labels=COCO_80))
    c = decode_yolo([transposed], specs_for([transposed]), geom, DecodeParams())  # no labels: C == 84
    assert a == b
    assert [(d.index, d.box) for d in c] == [(d.index, d.box) for d in a]


def test_yolo_v5_score_is_objectness_times_class_score():
    out = v5_output()
    dets = decode_yolo([out], specs_for([out]), LETTERBOX_640x480_IN_640, DecodeParams(labels=COCO_80))
    assert len(dets) == 1
    assert dets[0].label == "class3"
    assert dets[0].score == pytest.approx(0.72)
    approx_box(dets[0].box, PLANT_FRAME_BOX)


def test_yolo_layout_heuristic_and_override():
    assert yolo_layout_of((1, 84, 8400), 80) == ("v8", True)
    assert yolo_layout_of((1, 8400, 84), 80) == ("v8", False)
    assert yolo_layout_of((1, 25200, 85), 80) == ("v5", False)
    assert yolo_layout_of((1, 6, 8400)) == ("v8", True)  # channels-first without labels: v8
    assert yolo_layout_of((1, 25200, 7)) == ("v5", False)  # channels-last without labels: v5
    assert yolo_layout_of((1, 8400, 84)) == ("v8", False)  # the 80-class COCO v8 head, transposed
    assert yolo_layout_of((1, 8400, 84), layout="v5") == ("v5", False)
    with pytest.raises(ValueError):
        yolo_layout_of((1, 84, 8400), layout="v7")


def test_yolo_layout_override_decodes_an_unlabelled_v5_head():
    out = v5_output(nc=79)  # C == 84 would be guessed v8 without labels or override
    dets = decode_yolo([out], specs_for([out]), LETTERBOX_640x480_IN_640, DecodeParams(yolo_layout="v5"))
    assert [(d.label, round(d.score, 4)) for d in dets] == [("3", 0.72)]


def test_yolo_suppresses_overlapping_boxes_of_the_same_class_only():
    nc, n = 3, 10
    out = np.zeros((1, 4 + nc, n), dtype=np.float32)
    out[0, :4, 0] = [320, 320, 128, 96]
    out[0, :4, 1] = [324, 322, 128, 96]  # IoU with box 0 ~0.91
    out[0, :4, 2] = [326, 318, 128, 96]  # same place, other class
    out[0, 4 + 0, 0] = 0.9
    out[0, 4 + 0, 1] = 0.8
    out[0, 4 + 1, 2] = 0.7
    labels = ("a", "b", "c")
    dets = decode_yolo(
        [out], specs_for([out]), Geometry.stretch(640, 640, 640, 640), DecodeParams(labels=labels)
    )
    assert [(d.label, d.score) for d in dets] == [("a", pytest.approx(0.9)), ("b", pytest.approx(0.7))]


def test_yolo_accepts_boxes_already_normalised_to_the_input():
    out = v8_output()
    out[0, :4] /= 640.0  # every coordinate now <= 1
    dets = decode_yolo([out], specs_for([out]), LETTERBOX_640x480_IN_640, DecodeParams(labels=COCO_80))
    approx_box(dets[0].box, PLANT_FRAME_BOX)


def test_yolo_respects_threshold_and_max_detections():
    nc, n = 2, 50
    out = np.zeros((1, 4 + nc, n), dtype=np.float32)
    out[0, 0] = np.arange(n) * 12.0 + 6  # disjoint 10-px boxes in a row
    out[0, 1] = 100
    out[0, 2:4] = 10
    out[0, 4] = np.linspace(0.0, 0.98, n)
    geom = Geometry.stretch(640, 640, 640, 640)
    dets = decode_yolo([out], specs_for([out]), geom, DecodeParams(threshold=0.51, max_detections=1000))
    assert len(dets) == 24  # 0.52, 0.54, ..., 0.98
    dets = decode_yolo([out], specs_for([out]), geom, DecodeParams(threshold=0.51, max_detections=3))
    assert [d.score for d in dets] == pytest.approx(sorted(np.linspace(0.0, 0.98, n))[-3:][::-1])


def test_yolo_int8_head_is_dequantized_and_segmentation_protos_are_skipped():
    # A quantised head normalised to [0, 1] (as TFLite int8 exports are), scale 1/256, zero point -128,
    # with values chosen to be exactly representable.
    head = np.zeros((1, 4 + 2, 50), dtype=np.float32)
    head[0, :4] = 0.125
    head[0, :4, 42] = [0.5, 0.5, 0.25, 0.125]  # 320, 320, 160, 80 px in a 640x640 input
    head[0, 4 + 1, 42] = 0.9375
    q = np.rint(head * 256 - 128).astype(np.int8)
    protos = np.zeros((1, 32, 8, 8), dtype=np.float32)  # a -seg export's mask prototypes come second
    specs = [spec("output0", q.shape, np.int8, scale=1 / 256, zp=-128), spec("output1", protos.shape)]
    dets = decode_yolo([q, protos], specs, LETTERBOX_640x480_IN_640, DecodeParams(labels=("a", "b")))
    assert [(d.label, d.score) for d in dets] == [("b", 0.9375)]
    approx_box(dets[0].box, (240 / 640, 200 / 480, 400 / 640, 280 / 480))


def test_yolo_empty_when_nothing_passes():
    out = v8_output()
    dets = decode_yolo(
        [out], specs_for([out]), LETTERBOX_640x480_IN_640, DecodeParams(labels=COCO_80, threshold=0.95)
    )
    assert dets == []


# ----------------------------------------------------------------------------- metadata

ULTRALYTICS_META = {
    "description": "Ultralytics YOLO11n model trained on coco.yaml",
    "author": "Ultralytics",
    "stride": "32",
    "task": "detect",
    "batch": "1",
    "imgsz": "[640, 640]",
    "names": "{0: 'person', 1: 'bicycle', 2: 'car', 3: 'motorcycle'}",
    "args": "{'batch': 1, 'half': False, 'dynamic': False, 'nms': False}",
}


def test_yolo_meta_parses_ultralytics_metadata():
    names, imgsz = yolo_meta(ULTRALYTICS_META)
    assert names == ("person", "bicycle", "car", "motorcycle")
    assert imgsz == (640, 640)
    assert yolo_meta({"names": "{1: 'b', 0: 'a', 3: 'd'}", "imgsz": "[480, 640]"}) == (
        ("a", "b", "2", "d"),
        (480, 640),
    )
    assert yolo_meta({"imgsz": "320"}) == (None, (320, 320))


@pytest.mark.parametrize(
    "bad",
    [
        "__import__('os').system('x')",
        "__import__('pathlib').Path('pwned').touch()",
        "{0: __import__('pathlib').Path('pwned').touch()}",
        "{0: 'a', 'x': 'b'}",
        "{0: 1}",
        "not a literal",
        "[640, 640]",
        "{}",
        "{-1: 'a'}",
        "{10**9: 'a'}",
        "{100000000: 'a'}",
        "(" * 5000 + ")" * 5000,
    ],
)
def test_yolo_meta_rejects_malformed_or_malicious_names(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert yolo_meta({"names": bad}) == (None, None)
    assert list(tmp_path.iterdir()) == []  # nothing was executed


@pytest.mark.parametrize(
    "bad", ["__import__('os').system('x')", "[640, 'a']", "[0, 640]", "[1, 2, 3]", "True", ""]
)
def test_yolo_meta_rejects_malformed_imgsz(bad):
    assert yolo_meta({"imgsz": bad}) == (None, None)


# ----------------------------------------------------------------------------- raw


def test_raw_summarises_each_output_with_real_values():
    a = np.array([[1.0, -2.0, 5.0, 0.0]], dtype=np.float32)
    q = np.array([[10, 200, 30]], dtype=np.uint8)
    specs = [spec("logits", (1, 4)), spec("q", (1, 3), np.uint8, scale=0.5, zp=10)]
    ra, rq = decode_raw([a, q], specs)
    assert (ra.name, ra.shape, ra.dtype, ra.min, ra.max, ra.mean, ra.argmax) == (
        "logits",
        (1, 4),
        "float32",
        -2.0,
        5.0,
        1.0,
        2,
    )
    assert (rq.name, rq.dtype, rq.min, rq.max, rq.argmax) == ("q", "uint8", 0.0, 95.0, 1)
    assert rq.mean == pytest.approx((0 + 95 + 10) / 3)
    assert ra.to_json()["shape"] == [1, 4]


# ----------------------------------------------------------------------------- real ONNX models


@pytest.fixture
def onnx():
    """The onnx package; these tests skip (not the whole file) where it or onnxruntime is missing."""
    pytest.importorskip("onnxruntime")
    return pytest.importorskip("onnx")


def _session(onnx, graph, metadata: dict[str, str] | None = None):
    import onnxruntime as ort

    helper = onnx.helper
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _output_specs(sess) -> list[TensorSpec]:
    return [spec(o.name, tuple(o.shape), np.float32) for o in sess.get_outputs()]


def test_real_onnx_matmul_softmax_classifier_output_decodes_to_the_known_class(onnx):
    helper, tensor = onnx.helper, onnx.TensorProto
    # x = [0, 1, 0, 0] selects row 1 of w, logits (0, 4, 0): class 1 with softmax probability e^4/(e^4+2).
    w = np.array([[0, 1, 0], [0, 4, 0], [0, 0, 1], [1, 0, 0]], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("x", tensor.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("probs", tensor.FLOAT, [1, 3])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    sess = _session(onnx, graph)
    (probs,) = sess.run(None, {"x": np.array([[0, 1, 0, 0]], dtype=np.float32)})
    out = decode_classification(
        [probs], _output_specs(sess), DecodeParams(labels=("cat", "dog", "bird"), top_k=3, threshold=0.0)
    )
    e = np.exp(np.array([0.0, 4.0, 0.0]) - 4.0)
    assert [c.label for c in out][0] == "dog"
    assert out[0].score == pytest.approx(e[1] / e.sum(), abs=1e-6)  # probabilities were not softmaxed again


def test_real_onnx_v8_head_output_decodes_with_its_own_metadata(onnx):
    helper, tensor = onnx.helper, onnx.TensorProto
    head = v8_output(n=100, nc=4, cls=2)
    graph = helper.make_graph(
        [helper.make_node("Add", ["images", "zero"], ["output0"])],
        "tiny_yolo_head",
        [helper.make_tensor_value_info("images", tensor.FLOAT, list(head.shape))],
        [helper.make_tensor_value_info("output0", tensor.FLOAT, list(head.shape))],
        [onnx.numpy_helper.from_array(np.zeros((1,), np.float32), "zero")],
    )
    sess = _session(onnx, graph, ULTRALYTICS_META)
    outputs = sess.run(None, {"images": head})
    names, imgsz = yolo_meta(sess.get_modelmeta().custom_metadata_map)
    assert names is not None and imgsz == (640, 640)
    geom = Geometry.letterbox(640, 480, imgsz[1], imgsz[0])
    dets = decode_yolo(outputs, _output_specs(sess), geom, DecodeParams(labels=names))
    assert [(d.label, round(d.score, 4)) for d in dets] == [("car", 0.93)]
    approx_box(dets[0].box, PLANT_FRAME_BOX)
