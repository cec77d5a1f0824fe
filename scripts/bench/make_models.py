#!/usr/bin/env python3
"""Build benchmark models for edge-agent on demand (random weights, real architectures), outside git.

    python -m venv /tmp/bench-venv
    /tmp/bench-venv/bin/pip install -r scripts/bench/requirements.txt
    /tmp/bench-venv/bin/python scripts/bench/make_models.py [--out DIR] [--only onnx|tflite] [--force]

Writes into DIR (default: bench-models/ at the repo root, which is gitignored), each with a model.yaml
manifest beside it (<stem>.yaml):

  mobilenetv2_224.onnx         MobileNetV2 classifier, float32 [1,3,224,224] NCHW -> [1,1000] logits (torch)
  yolov8n_640.onnx             YOLOv8n detector, float32 [1,3,640,640] -> [1,84,8400], Ultralytics layout
                               and metadata (names, imgsz) (torch)
  mobilenetv2_224_float.tflite Keras MobileNetV2, float32 [1,224,224,3] NHWC -> [1,1000] softmax (TensorFlow)
  mobilenetv2_224_int8.tflite  the same, full-integer int8 with uint8 input and output (TensorFlow)

Weights are random: inference speed does not depend on them, and no weights are downloaded. The
architectures are defined here (torchvision and ultralytics are not needed). Files that already exist
are kept unless --force is given. TFLite needs TensorFlow; when it is missing or its converter fails,
the TFLite models are skipped with the reason (and the exit status is 1 only with --only tflite).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = "scripts/bench/requirements.txt"
INSTALL_HINT = f"pip install -r {REQUIREMENTS}"

IMAGENET_PREPROCESS = "  resize: crop\n  color: rgb\n  mean: [123.675, 116.28, 103.53]\n  std: [58.395, 57.12, 57.375]\n"
# tf.keras.applications.mobilenet_v2.preprocess_input: x / 127.5 - 1
KERAS_PREPROCESS = "  resize: crop\n  color: rgb\n  mean: [127.5, 127.5, 127.5]\n  std: [127.5, 127.5, 127.5]\n"
YOLO_PREPROCESS = "  resize: letterbox\n  color: rgb\n  mean: [0, 0, 0]\n  std: [255, 255, 255]\n"

COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


class BuildError(RuntimeError):
    """A model could not be built; the message says why and, where it helps, what to install."""


class Skip(RuntimeError):
    """The tooling for this model is missing or does not work here; the message says why."""


def log(msg: str) -> None:
    print(msg, flush=True)


def human_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def need(module: str, what: str):
    """Import ``module`` or fail with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        detail = "" if isinstance(exc, ModuleNotFoundError) and exc.name == module.split(".")[0] else f" ({exc})"
        raise BuildError(f"{module.split('.')[0]} is not installed (needed for {what}): {INSTALL_HINT}{detail}") from None


@contextlib.contextmanager
def quiet_fds() -> Iterator[io.StringIO]:
    """Send this process's stdout/stderr (Python and C level, e.g. TensorFlow's logging) to a buffer.

    The buffer is yielded so a caller can show it when something fails.
    """
    buf = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield buf
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            buf.write(tmp.read().decode("utf-8", "replace"))


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# torch architectures (defined inside a function so the module imports without torch)


def torch_models():
    """(MobileNetV2, YOLOv8) classes; raises BuildError when torch is missing."""
    torch = need("torch", "the ONNX models")
    nn = torch.nn

    # ---- MobileNetV2 (Sandler et al. 2018; the torchvision layout, width 1.0) ----
    class ConvBNReLU6(nn.Sequential):
        def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, groups: int = 1):
            super().__init__(nn.Conv2d(c1, c2, k, s, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(c2), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, c1: int, c2: int, stride: int, t: int):
            super().__init__()
            hidden = round(c1 * t)
            self.use_res = stride == 1 and c1 == c2
            layers: list = [ConvBNReLU6(c1, hidden, 1)] if t != 1 else []
            layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                       nn.Conv2d(hidden, c2, 1, bias=False), nn.BatchNorm2d(c2)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        # t (expansion), c (channels), n (repeats), s (stride of the first)
        CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                  (6, 160, 3, 2), (6, 320, 1, 1))

        def __init__(self, num_classes: int = 1000):
            super().__init__()
            layers: list = [ConvBNReLU6(3, 32, 3, 2)]
            c1 = 32
            for t, c, n, s in self.CONFIG:
                for i in range(n):
                    layers.append(InvertedResidual(c1, c, s if i == 0 else 1, t))
                    c1 = c
            layers.append(ConvBNReLU6(c1, 1280, 1))
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
            for m in self.modules():  # torchvision's initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    # ---- YOLOv8 (Ultralytics yolov8.yaml; scale n = depth 0.33, width 0.25) ----
    class Conv(nn.Module):
        def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
            self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
            self.act = nn.SiLU(inplace=True)

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    class Bottleneck(nn.Module):
        def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 1.0):
            super().__init__()
            c_ = int(c2 * e)
            self.cv1, self.cv2 = Conv(c1, c_, 3), Conv(c_, c2, 3)
            self.add = shortcut and c1 == c2

        def forward(self, x):
            y = self.cv2(self.cv1(x))
            return x + y if self.add else y

    class C2f(nn.Module):
        def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
            super().__init__()
            self.c = c = c2 // 2
            self.cv1 = Conv(c1, 2 * c, 1)
            self.cv2 = Conv((2 + n) * c, c2, 1)
            self.m = nn.ModuleList(Bottleneck(c, c, shortcut) for _ in range(n))

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            y.extend(m(y[-1]) for m in self.m)
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, c1: int, c2: int, k: int = 5):
            super().__init__()
            c_ = c1 // 2
            self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * 4, c2, 1)
            self.m = nn.MaxPool2d(k, 1, k // 2)

        def forward(self, x):
            y = [self.cv1(x)]
            y.extend(self.m(y[-1]) for _ in range(3))
            return self.cv2(torch.cat(y, 1))

    class DFL(nn.Module):
        """Distribution focal loss integral: softmax over reg_max bins, expectation by a fixed 1x1 conv."""

        def __init__(self, c1: int = 16):
            super().__init__()
            self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
            self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
            self.c1 = c1

        def forward(self, x):
            b, _, a = x.shape
            return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)

    class Detect(nn.Module):
        def __init__(self, nc: int, ch: tuple[int, ...], strides: tuple[int, ...], imgsz: int):
            super().__init__()
            self.nc, self.reg_max = nc, 16
            self.no = nc + 4 * self.reg_max
            c2, c3 = max(16, ch[0] // 4, 4 * self.reg_max), max(ch[0], min(nc, 100))
            self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1))
                                     for x in ch)
            self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
            self.dfl = DFL(self.reg_max)
            for a, b, s in zip(self.cv2, self.cv3, strides, strict=True):  # Ultralytics' bias_init
                a[-1].bias.data[:] = 1.0
                b[-1].bias.data[:nc] = math.log(5 / nc / (640 / s) ** 2)
            # Anchor centres (grid cell + 0.5) and strides for a fixed input size, as constants.
            points, stride_t = [], []
            for s in strides:
                h = w = imgsz // s
                sy, sx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
                points.append(torch.stack((sx, sy), -1).view(-1, 2))
                stride_t.append(torch.full((h * w, 1), float(s)))
            self.register_buffer("anchors", torch.cat(points).transpose(0, 1).unsqueeze(0))  # [1, 2, A]
            self.register_buffer("strides", torch.cat(stride_t).transpose(0, 1))  # [1, A]

        def forward(self, feats):
            b = feats[0].shape[0]
            x = torch.cat([torch.cat((self.cv2[i](f), self.cv3[i](f)), 1).view(b, self.no, -1)
                           for i, f in enumerate(feats)], 2)
            box, cls = x.split((4 * self.reg_max, self.nc), 1)
            lt, rb = self.dfl(box).chunk(2, 1)
            x1y1, x2y2 = self.anchors - lt, self.anchors + rb
            xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
            return torch.cat((xywh, cls.sigmoid()), 1)

    class YOLOv8(nn.Module):
        def __init__(self, nc: int = 80, depth: float = 0.33, width: float = 0.25, max_ch: int = 1024,
                     imgsz: int = 640):
            super().__init__()

            def ch(c: int) -> int:  # Ultralytics make_divisible(min(c, max_ch) * width, 8)
                return int(math.ceil(min(c, max_ch) * width / 8) * 8)

            def n(r: int) -> int:
                return max(round(r * depth), 1)

            c64, c128, c256, c512, c1024 = ch(64), ch(128), ch(256), ch(512), ch(1024)
            # backbone
            self.b0 = Conv(3, c64, 3, 2)
            self.b1 = Conv(c64, c128, 3, 2)
            self.b2 = C2f(c128, c128, n(3), True)
            self.b3 = Conv(c128, c256, 3, 2)
            self.b4 = C2f(c256, c256, n(6), True)  # P3/8
            self.b5 = Conv(c256, c512, 3, 2)
            self.b6 = C2f(c512, c512, n(6), True)  # P4/16
            self.b7 = Conv(c512, c1024, 3, 2)
            self.b8 = C2f(c1024, c1024, n(3), True)
            self.b9 = SPPF(c1024, c1024, 5)  # P5/32
            # PAN neck
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.h12 = C2f(c1024 + c512, c512, n(3))
            self.h15 = C2f(c512 + c256, c256, n(3))  # out P3
            self.h16 = Conv(c256, c256, 3, 2)
            self.h18 = C2f(c256 + c512, c512, n(3))  # out P4
            self.h19 = Conv(c512, c512, 3, 2)
            self.h21 = C2f(c512 + c1024, c1024, n(3))  # out P5
            self.detect = Detect(nc, (c256, c512, c1024), (8, 16, 32), imgsz)

        def forward(self, x):
            x = self.b2(self.b1(self.b0(x)))
            p3 = self.b4(self.b3(x))
            p4 = self.b6(self.b5(p3))
            p5 = self.b9(self.b8(self.b7(p4)))
            h12 = self.h12(torch.cat((self.up(p5), p4), 1))
            h15 = self.h15(torch.cat((self.up(h12), p3), 1))
            h18 = self.h18(torch.cat((self.h16(h15), h12), 1))
            h21 = self.h21(torch.cat((self.h19(h18), p5), 1))
            return self.detect([h15, h18, h21])

    return MobileNetV2, YOLOv8


# --------------------------------------------------------------------------------------------------
# builders: each writes its model file (and returns a short note for the log)


def seed_torch() -> None:
    """Same random weights every build, so a rebuilt model file is byte-identical."""
    need("torch", "the ONNX models").manual_seed(0)


def export_onnx(model, shape: tuple[int, ...], path: Path, metadata: dict[str, str] | None = None) -> str:
    """torch -> ONNX (opset 17, one self-contained file), checked against torch with onnxruntime."""
    torch = need("torch", "the ONNX models")
    onnx = need("onnx", "the ONNX models")
    np = need("numpy", "the ONNX models")
    torch.manual_seed(0)
    model.eval()
    x = torch.rand(*shape)
    with torch.no_grad():
        expected = model(x).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        # The TorchScript exporter (dynamo=False; deprecated, still in torch 2.13) writes clean opset 17.
        # The torch.export-based one (the default since torch 2.9, needs onnxscript) targets opset 18 and
        # its down-conversion to 17 leaves Split nodes with the opset-18 num_outputs attribute, which the
        # ONNX checker rejects; it is only the fallback here, at opset 18, for a torch without the old one.
        attempts = [("TorchScript exporter", {"dynamo": False, "opset_version": 17}),
                    ("torch.export exporter", {"dynamo": True, "opset_version": 18, "external_data": False})]
        errors = []
        for how, kwargs in attempts:
            with quiet_fds() as logbuf:
                try:
                    torch.onnx.export(model, (x,), str(out), input_names=["images"], output_names=["output0"],
                                      **kwargs)
                except Exception as exc:  # noqa: BLE001 - reported below with the exporter's log
                    errors.append(f"{how}: {type(exc).__name__}: {exc}\n{logbuf.getvalue()[-2000:]}")
                    continue
            break
        else:
            hint = "" if importlib.util.find_spec("onnxscript") else " (pip install onnxscript for the second)"
            raise BuildError("torch.onnx.export failed with both exporters" + hint + ":\n" + "\n".join(errors))
        how = f"{how}, opset {kwargs['opset_version']}"
        m = onnx.load(str(out))
        if metadata:
            for k, v in metadata.items():
                entry = m.metadata_props.add()
                entry.key, entry.value = k, v
        m.producer_name = "edge-agent scripts/bench/make_models.py"
        onnx.checker.check_model(m)
        data = m.SerializeToString()
    got = onnx_check(data, x.numpy(), expected.shape)
    diff = float(np.abs(got - expected).max())
    tol = 1e-3 * max(1.0, float(np.abs(expected).max()))
    if not diff <= tol:
        raise BuildError(f"{path.name}: onnxruntime differs from torch by {diff} (> {tol})")
    write_atomic(path, data)
    return f"{how}; onnxruntime output {list(got.shape)}, max |ort - torch| = {diff:.2e}"


def onnx_check(data: bytes, x, want_shape: tuple[int, ...]):
    ort = need("onnxruntime", "checking the ONNX models")
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    if list(inp.shape) != list(x.shape) or inp.type != "tensor(float)":
        raise BuildError(f"ONNX input is {inp.type} {inp.shape}, expected float {list(x.shape)}")
    (got,) = sess.run(None, {inp.name: x})
    if tuple(got.shape) != tuple(want_shape):
        raise BuildError(f"ONNX output shape {got.shape}, expected {want_shape}")
    return got


def build_mobilenet_onnx(path: Path) -> str:
    MobileNetV2, _ = torch_models()
    seed_torch()
    return export_onnx(MobileNetV2(), (1, 3, 224, 224), path)


def build_yolo_onnx(path: Path) -> str:
    _, YOLOv8 = torch_models()
    seed_torch()
    model = YOLOv8()
    params = sum(p.numel() for p in model.parameters())
    meta = {
        "description": "YOLOv8n-shaped detector with random weights (edge-agent benchmark model)",
        "author": "edge-agent scripts/bench/make_models.py",
        "task": "detect",
        "stride": "32",
        "batch": "1",
        "imgsz": "[640, 640]",
        "names": repr(dict(enumerate(COCO_NAMES))),
    }
    note = export_onnx(model, (1, 3, 640, 640), path, meta)
    return f"{params / 1e6:.2f}M parameters; {note}"


def _convert(configure: Callable) -> bytes:
    """Keras MobileNetV2 (random weights) -> .tflite bytes; ``configure(tf, converter)`` sets quantisation.

    Raises Skip, with the reason and the tail of TensorFlow's log, when any step fails.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if importlib.util.find_spec("tensorflow") is None:
        raise Skip(f"tensorflow is not installed: {INSTALL_HINT}")
    stage = "import tensorflow"
    with quiet_fds() as logbuf:  # TensorFlow and Keras log a lot, some of it from C++ straight to fd 2
        try:
            import tensorflow as tf

            stage = "tf.keras.applications.MobileNetV2(weights=None)"
            tf.keras.utils.set_random_seed(0)
            model = tf.keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
            stage = f"tf.lite.TFLiteConverter (TensorFlow {tf.__version__}, Keras {tf.keras.__version__})"
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            configure(tf, converter)
            data = converter.convert()
        except Exception as exc:  # noqa: BLE001 - any failure means "this tooling does not work here"
            err = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        else:
            err = None
    if err is not None:
        tail = "\n".join(line for line in logbuf.getvalue().splitlines()[-15:] if line.strip())
        raise Skip(f"{stage} failed: {err}" + (f"\n--- TensorFlow log (last lines) ---\n{tail}" if tail else ""))
    return data


def tflite_check(data: bytes, want_in: str, want_out_shape: tuple[int, ...]) -> str:
    np = need("numpy", "checking the TFLite models")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tensorflow.lite import Interpreter  # type: ignore[no-redef]
        except ImportError as exc:
            return f"not run (no TFLite interpreter: {exc})"
    with quiet_fds():
        interp = Interpreter(model_content=data, num_threads=2)
        interp.allocate_tensors()
        (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
        x = (np.random.default_rng(0).integers(0, 256, inp["shape"]) if np.dtype(inp["dtype"]).kind in "iu"
             else np.random.default_rng(0).uniform(-1, 1, inp["shape"])).astype(inp["dtype"])
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        y = interp.get_tensor(out["index"])
    if np.dtype(inp["dtype"]).name != want_in:
        raise BuildError(f"TFLite input is {np.dtype(inp['dtype']).name}, expected {want_in}")
    if tuple(y.shape) != want_out_shape:
        raise BuildError(f"TFLite output shape {y.shape}, expected {want_out_shape}")
    q = inp["quantization"]
    qs = f", input scale/zero point {q[0]:.6g}/{q[1]}" if q[0] else ""
    return (f"interpreter ok: {np.dtype(inp['dtype']).name}{[int(d) for d in inp['shape']]} -> "
            f"{y.dtype}{list(y.shape)}{qs}")


def build_mobilenet_tflite_float(path: Path) -> str:
    data = _convert(lambda tf, c: None)
    note = tflite_check(data, "float32", (1, 1000))
    write_atomic(path, data)
    return note


def build_mobilenet_tflite_int8(path: Path) -> str:
    def configure(tf, c) -> None:
        import numpy as np

        def representative():  # random images in the model's input range [-1, 1]
            rng = np.random.default_rng(0)
            for _ in range(16):
                yield [rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)]

        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = representative
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        c.inference_input_type = tf.uint8
        c.inference_output_type = tf.uint8

    data = _convert(configure)
    note = tflite_check(data, "uint8", (1, 1000))
    write_atomic(path, data)
    return note


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    filename: str
    group: str  # onnx | tflite
    build: Callable[[Path], str]
    manifest: str

    @property
    def yaml_name(self) -> str:
        return Path(self.filename).stem + ".yaml"


def manifest(name: str, task: str, preprocess: str, comment: str) -> str:
    return (f"# {comment}\n# Benchmark model with RANDOM weights, built by scripts/bench/make_models.py:"
            f" its outputs mean nothing.\nname: {name}\nversion: \"0.0.0-bench\"\ntask: {task}\n"
            f"preprocess:\n{preprocess}")


TARGETS = (
    Target("mobilenetv2_224.onnx", "onnx", build_mobilenet_onnx,
           manifest("mobilenetv2-224-bench", "classification", IMAGENET_PREPROCESS,
                    "MobileNetV2 1.0, float32 [1,3,224,224] NCHW -> [1,1000] logits (no labels: classes are named by index)")),
    Target("yolov8n_640.onnx", "onnx", build_yolo_onnx,
           manifest("yolov8n-640-bench", "yolo", YOLO_PREPROCESS,
                    "YOLOv8n, float32 [1,3,640,640] -> [1,84,8400]; COCO names and imgsz come from the ONNX metadata")),
    Target("mobilenetv2_224_float.tflite", "tflite", build_mobilenet_tflite_float,
           manifest("mobilenetv2-224-float-bench", "classification", KERAS_PREPROCESS,
                    "Keras MobileNetV2 1.0, float32 [1,224,224,3] NHWC -> [1,1000] softmax; input in [-1, 1]")),
    Target("mobilenetv2_224_int8.tflite", "tflite", build_mobilenet_tflite_int8,
           manifest("mobilenetv2-224-int8-bench", "classification", KERAS_PREPROCESS,
                    "Keras MobileNetV2 1.0, full-integer int8, uint8 [1,224,224,3] -> uint8 [1,1000];"
                    " the runtime quantises the\n# normalised input with the input tensor's scale/zero point")),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", type=Path, default=ROOT / "bench-models", help="output folder (default: %(default)s)")
    parser.add_argument("--only", choices=("onnx", "tflite"), help="build only this group")
    parser.add_argument("--force", action="store_true", help="rebuild files that already exist")
    args = parser.parse_args(argv)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    targets = [t for t in TARGETS if args.only in (None, t.group)]
    log(f"building {len(targets)} benchmark models into {out}")
    built, kept, skipped, failed = [], [], [], []
    missing: dict[str, str] = {}
    t_all = time.perf_counter()
    for i, t in enumerate(targets, 1):
        path, ypath = out / t.filename, out / t.yaml_name
        head = f"[{i}/{len(targets)}] {t.filename}"
        if path.exists() and not args.force:
            if not ypath.exists():
                ypath.write_text(t.manifest)
            log(f"{head}: exists ({human_size(path.stat().st_size)}), kept (--force rebuilds)")
            kept.append(t.filename)
            continue
        if t.group in missing:
            log(f"{head}: FAILED: {missing[t.group]}")
            failed.append((t.filename, missing[t.group]))
            continue
        log(f"{head}: building ...")
        t0 = time.perf_counter()
        try:
            note = t.build(path)
        except Skip as exc:
            log(f"{head}: SKIPPED after {time.perf_counter() - t0:.1f}s: {exc}")
            skipped.append((t.filename, str(exc).splitlines()[0]))
            continue
        except BuildError as exc:
            log(f"{head}: FAILED after {time.perf_counter() - t0:.1f}s: {exc}")
            failed.append((t.filename, str(exc).splitlines()[0]))
            if "is not installed" in str(exc):
                missing[t.group] = str(exc)  # the rest of this group needs the same tooling
            continue
        ypath.write_text(t.manifest)
        log(f"{head}: done in {time.perf_counter() - t0:.1f}s, {human_size(path.stat().st_size)} (+ {ypath.name}); {note}")
        built.append(t.filename)

    log(f"\n{len(built)} built, {len(kept)} kept, {len(skipped)} skipped, {len(failed)} failed"
        f" in {time.perf_counter() - t_all:.1f}s -> {out}")
    for name, why in skipped:
        log(f"  skipped {name}: {why}")
    for name, why in failed:
        log(f"  FAILED  {name}: {why}")
    if failed or (skipped and args.only == "tflite"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
