"""ONNX Runtime backend: an explicit provider list, and a report of what really runs."""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import numpy as np

from agent.hardware.facts import HardwareFacts, RuntimeAvailability
from agent.runtimes.base import (
    ModelFormat,
    ModelLoadError,
    RuntimeChoice,
    RuntimeChoiceError,
    RuntimeUnavailable,
    Session,
    SessionInfo,
    TensorSpec,
    error_text,
)

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}
# Best first: auto takes the first one this onnxruntime build has; CPU is always last and always there.
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
ACCELERATOR_OF = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
PROVIDER_OF = {accel: provider for provider, accel in ACCELERATOR_OF.items()}


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return TensorSpec(name=arg.name, shape=shape, dtype=np.dtype(_ORT_TYPES.get(arg.type, np.float32)))


def provider_options(providers: tuple[str, ...], cache_dir: Path | None, model_sha256: str) -> list:
    """Providers with their options; TensorRT engines cached per model hash (builds take minutes on Jetson)."""
    out: list = []
    for p in providers:
        if p == "TensorrtExecutionProvider" and cache_dir is not None:
            engine_dir = cache_dir / "trt" / model_sha256[:16]
            engine_dir.mkdir(parents=True, exist_ok=True)
            out.append((p, {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(engine_dir),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(engine_dir),
                "trt_fp16_enable": True,
            }))
        else:
            out.append(p)
    return out


class OnnxSession:
    """An onnxruntime InferenceSession behind the common session interface."""

    def __init__(
        self,
        path: str | Path,
        *,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        threads: int = 0,
        cache_dir: Path | None = None,
        model_sha256: str = "",
        safe: bool = False,
        spin: bool = False,
    ):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailable(f"onnxruntime does not import ({exc}); pip install onnxruntime") from exc
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Safe mode (a load that crashed its trial child): only the graph rewrites every build has.
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if safe
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        opts.log_severity_level = 3
        # ORT's pool spin-waits between runs by default: a core burned at 15 fps on a Pi, but faster
        # at full rate on some models. runtime.spin decides (agent/inference/spin.py).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        notes: list[str] = []
        built_in = set(ort.get_available_providers())
        missing = [p for p in providers if p not in built_in]
        if missing:
            notes.append(f"{', '.join(missing)} not in this onnxruntime build; running on what is")
            providers = tuple(p for p in providers if p in built_in) or ("CPUExecutionProvider",)
        try:
            sess = ort.InferenceSession(
                str(path), sess_options=opts, providers=provider_options(providers, cache_dir, model_sha256)
            )
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad files
            if providers != ("CPUExecutionProvider",):
                log.warning("onnxruntime could not start %s (%s); retrying on CPU", providers[0], exc)
                sess = None
            else:
                raise ModelLoadError(f"{path}: not a loadable ONNX model ({exc})") from exc
        if sess is None:
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001
                raise ModelLoadError(f"{path}: not a loadable ONNX model ({exc})") from exc
            notes.append(f"{providers[0]} failed to start; running on CPU")
        active = tuple(sess.get_providers())
        wanted = providers[0]
        if notes:
            log.warning("onnxruntime: %s", notes[-1])
        elif wanted not in active:
            # ORT silently drops a provider whose libraries fail to load: say so instead.
            notes.append(f"{wanted} requested but not loaded; running on {active[0]}")
            log.warning("onnxruntime: %s", notes[-1])
        self._sess = sess
        self.info = SessionInfo(
            backend="onnxruntime",
            accelerator=ACCELERATOR_OF.get(active[0], active[0]),
            module=f"onnxruntime {ort.__version__}",
            providers=active,
            notes=tuple(notes),
        )
        self.inputs = tuple(_spec(a) for a in sess.get_inputs())
        self.outputs = tuple(_spec(a) for a in sess.get_outputs())
        self._in_names = [a.name for a in sess.get_inputs()]
        self.metadata = dict(sess.get_modelmeta().custom_metadata_map)
        self._binding, self._out_bufs = self._bind_outputs(sess) if active[0] == "CPUExecutionProvider" else (None, [])
        self.reuses_outputs = self._binding is not None  # run() returns the same arrays every time

    @property
    def ort(self):
        """The onnxruntime InferenceSession itself (the bench's bare loop calls it directly)."""
        return self._sess

    def _bind_outputs(self, sess) -> tuple[object | None, list[np.ndarray]]:
        """IO binding with every output written into a buffer we own: no allocation or copy per run.

        Only when every output has a static shape and a known type; otherwise plain ``run``.
        """
        if any(a.type not in _ORT_TYPES for a in sess.get_outputs()) or any(
                d < 0 for spec in self.outputs for d in spec.shape):
            return None, []
        bufs = [np.empty(spec.shape, spec.dtype) for spec in self.outputs]
        binding = sess.io_binding()
        for spec, buf in zip(self.outputs, bufs, strict=True):
            binding.bind_output(spec.name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
        return binding, bufs

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Infer. On CPU with static output shapes the arrays returned are reused by the next ``run``."""
        if self._binding is None:
            return self._sess.run(None, dict(zip(self._in_names, inputs, strict=True)))
        binding = self._binding
        for name, arr, spec in zip(self._in_names, inputs, self.inputs, strict=True):
            if arr.dtype != spec.dtype or not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr, dtype=spec.dtype)
            binding.bind_cpu_input(name, arr)  # no copy: the binding reads (and keeps a reference to) arr
        self._sess.run_with_iobinding(binding)
        return self._out_bufs

    def close(self) -> None:
        self._sess = None
        self._binding, self._out_bufs = None, []  # the binding holds the session too


# -- availability and choice ---------------------------------------------------------------------

@functools.cache
def check_onnxruntime() -> RuntimeAvailability:
    """onnxruntime version and execution providers compiled into this build (never raises)."""
    try:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    except Exception as exc:
        return RuntimeAvailability("onnxruntime", False, error=error_text(exc))
    return RuntimeAvailability("onnxruntime", True, version=onnxruntime.__version__, providers=providers)


def choose(facts: HardwareFacts, accelerator: str) -> RuntimeChoice:
    """The best provider this onnxruntime has (TensorRT, then CUDA, then CPU), or the pinned one."""
    if accelerator == "edgetpu":
        raise RuntimeChoiceError("the Edge TPU runs only Edge TPU-compiled .tflite models, not .onnx; "
                                 "set runtime.accelerator: auto")
    ort = facts.runtimes.get("onnxruntime")
    if ort is None or not ort.available:
        err = ort.error if ort else "runtimes were not probed"
        raise RuntimeChoiceError(f"onnxruntime is not usable ({err}); pip install onnxruntime")
    installed = ", ".join(ort.providers) or "none"
    if accelerator == "auto":
        best = next((p for p in PROVIDERS if p in ort.providers), PROVIDERS[-1])
    else:
        best = PROVIDER_OF[accelerator]
        if best not in ort.providers:
            hint = "install onnxruntime-gpu" if accelerator != "cpu" else "reinstall onnxruntime"
            raise RuntimeChoiceError(
                f"accelerator '{accelerator}' requested but onnxruntime has no {best} "
                f"(installed providers: {installed}); {hint} or set runtime.accelerator: auto")
    below = PROVIDERS[PROVIDERS.index(best):]
    providers = tuple(p for p in below if p in ort.providers or p == PROVIDERS[-1])
    accel = ACCELERATOR_OF[best]
    if accelerator != "auto":
        why = "pinned by runtime.accelerator"
    elif accel != "cpu":
        why = f"{best} available"
    elif facts.gpu_devices:
        why = f"GPU {facts.gpu_devices[0]} present but onnxruntime has only {installed}; install onnxruntime-gpu"
    else:
        why = f"no GPU provider; installed providers: {installed}"
    label = {"tensorrt": "TensorRT", "cuda": "CUDA", "cpu": "CPU"}[accel]
    return RuntimeChoice("onnxruntime", "onnxruntime", accel, providers, f"onnx model → onnxruntime {label} ({why})")


# -- the backend ---------------------------------------------------------------------------------

def _is_onnx(head: bytes) -> bool:
    # ModelProto starts with field 1 (ir_version, varint: tag 0x08) and a small version number.
    return len(head) >= 2 and head[0] == 0x08 and 0 < head[1] < 0x40


class OnnxBackend:
    """ONNX models on onnxruntime with an explicit provider list (TensorRT, CUDA, CPU)."""

    name = "onnxruntime"
    label = "onnxruntime"
    rank = 20
    formats = (ModelFormat("onnx", "ONNX", ".onnx", _is_onnx),)
    modules = ("onnxruntime",)
    safe_mode = "the CPU provider with basic graph optimisations"

    def availability(self, first_only: bool, safe: bool = False) -> dict[str, RuntimeAvailability]:
        return {"onnxruntime": check_onnxruntime()}  # an import: no safer way to do it

    def preload(self, facts: HardwareFacts) -> list[str]:
        return ["onnxruntime"]  # a module that does not import is skipped by the forkserver

    def compiled_for(self, path: Path) -> str | None:
        return None

    def choose(self, facts: HardwareFacts, accelerator: str, compiled_for: str | None) -> RuntimeChoice:
        return choose(facts, accelerator)

    def safe_choice(self, choice: RuntimeChoice) -> RuntimeChoice | None:
        if choice.safe:
            return None
        return dataclasses.replace(choice, accelerator="cpu", providers=("CPUExecutionProvider",), safe=True,
                                   reason="onnx model → onnxruntime CPU, basic graph optimisations")

    def open(self, path: Path, choice: RuntimeChoice, *, threads: int, cache_dir: Path | None,
             model_sha256: str) -> Session:
        return OnnxSession(path, providers=tuple(choice.providers) or ("CPUExecutionProvider",), threads=threads,
                           cache_dir=cache_dir, model_sha256=model_sha256, safe=choice.safe,
                           spin=choice.spin)

    def embedded_labels(self, path: Path) -> tuple[str, ...]:
        return ()


BACKEND = OnnxBackend()
