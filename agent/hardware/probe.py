"""Hardware probe and runtime choice.

Facts are read from a filesystem root (default "/") so every parser runs on fixture trees;
``choose_runtime`` is a pure function of those facts.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import os
import platform as _platform
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

TFLITE_MODULES = ("tflite_runtime", "ai_edge_litert", "tensorflow.lite")
ORT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_PROVIDER_OF = {"tensorrt": ORT_PROVIDERS[0], "cuda": ORT_PROVIDERS[1], "cpu": ORT_PROVIDERS[2]}
_ACCEL_OF = {v: k for k, v in _PROVIDER_OF.items()}
_PIP_NAME = {"tflite_runtime": "tflite-runtime", "ai_edge_litert": "ai-edge-litert", "tensorflow.lite": "tensorflow"}
TEGRA_SOCS = {
    "tegra210": "Jetson Nano/TX1 (tegra210)",
    "tegra186": "Jetson TX2 (tegra186)",
    "tegra194": "Jetson Xavier (tegra194)",
    "tegra234": "Jetson Orin (tegra234)",
}
LIBEDGETPU_DIRS = ("usr/lib", "usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu",
                   "usr/lib/arm-linux-gnueabihf", "usr/local/lib")
# Coral USB enumerates as Global Unichip 1a6e:089a until its firmware loads, then as Google 18d1:9302.
CORAL_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}
GPU_NODES = ("dev/nvidia0", "dev/nvhost-gpu", "dev/nvgpu/igpu0", "dev/dri/renderD128")
THROTTLE_BITS = {
    "under_voltage": 0, "arm_freq_capped": 1, "throttled": 2, "soft_temp_limit": 3,
    "under_voltage_occurred": 16, "arm_freq_capped_occurred": 17,
    "throttled_occurred": 18, "soft_temp_limit_occurred": 19,
}


class RuntimeChoiceError(ValueError):
    """The requested backend/accelerator cannot run this model here; the message says how to fix it."""


@dataclass(frozen=True)
class Throttled:
    """Raspberry Pi firmware ``get_throttled`` word with its bits decoded."""

    raw: int
    under_voltage: bool = False
    arm_freq_capped: bool = False
    throttled: bool = False
    soft_temp_limit: bool = False
    under_voltage_occurred: bool = False
    arm_freq_capped_occurred: bool = False
    throttled_occurred: bool = False
    soft_temp_limit_occurred: bool = False

    @classmethod
    def from_raw(cls, raw: int) -> Throttled:
        return cls(raw, **{name: bool(raw >> bit & 1) for name, bit in THROTTLE_BITS.items()})

    @property
    def active_flags(self) -> list[str]:
        return [name for name in THROTTLE_BITS if getattr(self, name)]

    def to_json(self) -> dict:
        return {"raw": hex(self.raw), **{name: getattr(self, name) for name in THROTTLE_BITS}}


@dataclass(frozen=True)
class RuntimeAvailability:
    """Whether one runtime module works here: version when it does, error text when not."""

    name: str
    available: bool
    version: str | None = None
    error: str | None = None
    providers: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {**asdict(self), "providers": list(self.providers)}


@dataclass(frozen=True)
class HardwareFacts:
    """Everything the probe learned; ``runtimes`` is empty when runtimes were not checked."""

    platform: str  # "raspberry-pi" | "jetson" | "generic"
    model: str
    arch: str
    cpu_count: int | None = None
    memory_mb: int | None = None
    soc: str | None = None  # e.g. "tegra234"
    l4t_release: str | None = None  # e.g. "36.3.0"
    thermal: tuple[tuple[str, float], ...] = ()
    throttled: Throttled | None = None
    edgetpu_library: bool = False
    edgetpu_devices: tuple[str, ...] = ()  # e.g. "pcie:/dev/apex_0", "usb:18d1:9302"
    gpu_devices: tuple[str, ...] = ()
    runtimes: Mapping[str, RuntimeAvailability] = field(default_factory=dict)

    @property
    def has_edgetpu(self) -> bool:
        # The delegate needs both the user-space library and a device to talk to.
        return self.edgetpu_library and bool(self.edgetpu_devices)

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("throttled", "runtimes", "thermal")}
        return {
            **data,
            "edgetpu_devices": list(self.edgetpu_devices),
            "gpu_devices": list(self.gpu_devices),
            "has_edgetpu": self.has_edgetpu,
            "thermal": dict(self.thermal),
            "throttled": self.throttled.to_json() if self.throttled else None,
            "runtimes": {name: r.to_json() for name, r in self.runtimes.items()},
        }


@dataclass(frozen=True)
class RuntimeChoice:
    """Which backend, module and accelerator to load a model with, and why."""

    backend: str  # "tflite" | "onnxruntime"
    module: str  # e.g. "ai_edge_litert", "onnxruntime"
    accelerator: str  # "cpu" | "xnnpack" | "edgetpu" | "cuda" | "tensorrt"
    providers: tuple[str, ...] = ()
    reason: str = ""


# ---------------------------------------------------------------- file facts


def _read_text(path: Path) -> str | None:
    """File text, or None when missing/unreadable (absent fact, never an error)."""
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def _device_tree(root: Path, name: str) -> str | None:
    for base in ("proc/device-tree", "sys/firmware/devicetree/base"):
        text = _read_text(root / base / name)
        if text is not None:
            return text
    return None


def _parse_l4t(text: str | None) -> tuple[str | None, str | None]:
    """(release "32.7.1", EABI arch) from the first line of /etc/nv_tegra_release."""
    if not text:
        return None, None
    line = text.splitlines()[0] if text.splitlines() else ""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", line)
    release = f"{m[1]}.{m[2]}.{m[3] or 0}" if m else None
    eabi = re.search(r"EABI:\s*(\w+)", line)
    return release, eabi[1] if eabi else None


def _count_cpus(cpuinfo: str | None) -> int | None:
    if cpuinfo is None:
        return None
    return len(re.findall(r"^processor\s*:\s*\d+", cpuinfo, re.MULTILINE)) or None


def _memory_mb(meminfo: str | None) -> int | None:
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo or "", re.MULTILINE)
    return int(m[1]) // 1024 if m else None


def thermal_zones(root: str | Path = "/") -> list[Path]:
    """The thermal zone directories, in zone order (a health sampler finds them once)."""
    return sorted(Path(root).glob("sys/class/thermal/thermal_zone*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))


def read_temperatures(root: str | Path = "/", zones: list[Path] | None = None) -> dict[str, float]:
    """Zone type → °C for every readable thermal zone (duplicate types get the zone name appended)."""
    if zones is None:
        zones = thermal_zones(root)
    temps: dict[str, float] = {}
    for zone in zones:
        kind, temp = _read_text(zone / "type"), _read_text(zone / "temp")
        try:
            celsius = int(temp.strip()) / 1000.0  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            continue  # some zones return EINVAL or nothing while their sensor is off
        name = (kind or "").strip() or zone.name
        temps[f"{name} ({zone.name})" if name in temps else name] = celsius
    return temps


def throttled_path(root: str | Path = "/") -> Path | None:
    """Where the firmware's throttling word is on a Raspberry Pi, None elsewhere.

    The search walks sysfs (hundreds of entries on a Pi), so a health sampler does it once.
    """
    platform_dir = Path(root) / "sys/devices/platform"
    candidates = [platform_dir / "soc/soc:firmware/get_throttled"]
    # Firmware node naming differs by kernel/board (e.g. Pi 5's soc@107c000000); bounded depth keeps it cheap.
    for depth in range(1, 4):
        candidates += sorted(platform_dir.glob("*/" * depth + "get_throttled"))
    return next((p for p in candidates if _read_text(p) is not None), None)


def read_throttled(root: str | Path = "/", path: Path | None = None) -> Throttled | None:
    """Decoded firmware throttling word on a Raspberry Pi (at ``path`` if known), None elsewhere."""
    path = path or throttled_path(root)
    text = _read_text(path) if path is not None else None
    try:
        return Throttled.from_raw(int(text.strip(), 16)) if text is not None else None
    except ValueError:
        return None


def _edgetpu_devices(root: Path) -> tuple[str, ...]:
    found = [f"pcie:/{p.relative_to(root)}" for p in sorted(root.glob("dev/apex_*"))]
    for dev in sorted(root.glob("sys/bus/usb/devices/*")):
        ids = (_read_text(dev / "idVendor"), _read_text(dev / "idProduct"))
        if None not in ids:
            vendor, product = (s.strip().lower() for s in ids)  # type: ignore[union-attr]
            if (vendor, product) in CORAL_USB_IDS:
                found.append(f"usb:{vendor}:{product}")
    return tuple(found)


def probe(root: str | Path = "/", *, check_runtimes: bool | str = True, arch: str | None = None) -> HardwareFacts:
    """Read hardware facts under ``root``; optionally check which inference runtimes work.

    ``check_runtimes="first"`` checks TFLite modules only until one works (what the daemon needs).
    """
    root = Path(root)
    is_host = root.resolve() == Path("/")
    dt_model = (_device_tree(root, "model") or "").replace("\x00", "").strip() or None
    compatible = [c for c in (_device_tree(root, "compatible") or "").split("\x00") if c]
    l4t, eabi = _parse_l4t(_read_text(root / "etc/nv_tegra_release"))
    soc = next((c.split(",", 1)[1] for c in compatible if c.startswith("nvidia,tegra")), None)
    if l4t or soc:
        kind, model = "jetson", dt_model or TEGRA_SOCS.get(soc or "", "NVIDIA Jetson")
    elif dt_model and dt_model.startswith("Raspberry Pi"):
        kind, model = "raspberry-pi", dt_model
    else:
        kind, model = "generic", dt_model or "generic Linux"
    cpus = _count_cpus(_read_text(root / "proc/cpuinfo"))
    return HardwareFacts(
        platform=kind,
        model=model,
        arch=arch or eabi or _platform.machine(),
        cpu_count=cpus if cpus or not is_host else os.cpu_count(),
        memory_mb=_memory_mb(_read_text(root / "proc/meminfo")),
        soc=soc,
        l4t_release=l4t,
        thermal=tuple(read_temperatures(root).items()),
        throttled=read_throttled(root),
        edgetpu_library=any((root / d / "libedgetpu.so.1").exists() for d in LIBEDGETPU_DIRS),
        edgetpu_devices=_edgetpu_devices(root),
        gpu_devices=tuple(f"/{n}" for n in GPU_NODES if (root / n).exists()),
        runtimes=detect_runtimes(first_tflite_only=check_runtimes == "first") if check_runtimes else {},
    )


# ---------------------------------------------------------------- runtimes


def _error_text(exc: BaseException) -> str:
    # A C extension that fails inside reports SystemError; the real reason is the chained exception.
    while isinstance(exc, SystemError) and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}"[:300]
    if "_ARRAY_API" in text or "numpy.core.multiarray failed" in text:
        import numpy

        text += f" (built for numpy 1.x, this is numpy {numpy.__version__}: it needs numpy<2)"
    return text


def _test_model() -> Path:
    import agent

    return Path(agent.__file__).resolve().parent.parent / "models/face/blazeface.tflite"


def _load_tflite(name: str) -> str | None:
    """Import module ``name``, build an interpreter on the bundled model if present; return its version."""
    from agent.runtimes.tflite import _import  # the same import the session makes

    interpreter_cls = _import(name).Interpreter
    top = "tensorflow" if name == "tensorflow.lite" else name
    version = getattr(importlib.import_module(top), "__version__", None)
    # Importing is not enough: tflite-runtime 2.14 imports under numpy 2 but fails here.
    if _test_model().is_file():
        interpreter_cls(model_path=str(_test_model())).allocate_tensors()
    return version


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 during a check: a numpy-1 extension under numpy 2 prints a page of C-level noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@functools.cache
def check_tflite_module(name: str) -> RuntimeAvailability:
    """Whether TFLite module ``name`` imports and really builds an interpreter (never raises)."""
    try:
        with warnings.catch_warnings(), _quiet_stderr():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter warns that it is deprecated
            version = _load_tflite(name)
    except Exception as exc:
        return RuntimeAvailability(name, False, error=_error_text(exc))
    if version is None:
        try:
            version = importlib.metadata.version(_PIP_NAME[name])
        except importlib.metadata.PackageNotFoundError:
            pass
    return RuntimeAvailability(name, True, version=version)


@functools.cache
def check_onnxruntime() -> RuntimeAvailability:
    """onnxruntime version and execution providers compiled into this build."""
    try:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    except Exception as exc:
        return RuntimeAvailability("onnxruntime", False, error=_error_text(exc))
    return RuntimeAvailability("onnxruntime", True, version=onnxruntime.__version__, providers=providers)


def detect_runtimes(first_tflite_only: bool = False) -> dict[str, RuntimeAvailability]:
    """Availability of the TFLite modules and onnxruntime (cached per process).

    ``first_tflite_only`` stops at the first TFLite module that works, so a daemon on a machine
    that also has full TensorFlow never pays for importing it.
    """
    found: dict[str, RuntimeAvailability] = {}
    for name in TFLITE_MODULES:
        found[name] = check_tflite_module(name)
        if first_tflite_only and found[name].available:
            break
    return {**found, "onnxruntime": check_onnxruntime()}


# ---------------------------------------------------------------- choice


def is_edgetpu_model(path: str | Path) -> bool:
    """True when the model was compiled by edgetpu_compiler (it embeds the custom op name)."""
    try:
        return b"edgetpu-custom-op" in Path(path).read_bytes()
    except OSError:
        return False


def _choose_tflite(facts: HardwareFacts, accelerator: str, model_is_edgetpu: bool) -> RuntimeChoice:
    tried = [facts.runtimes[n] for n in TFLITE_MODULES if n in facts.runtimes]
    working = next((r for r in tried if r.available), None)
    if working is None:
        detail = "; ".join(f"{r.name}: {r.error}" for r in tried) or "runtimes were not probed"
        raise RuntimeChoiceError(
            f"no working TFLite runtime (tried {', '.join(TFLITE_MODULES)}: {detail}); "
            "install one with pip install 'edge-agent[tflite]'")
    # Mention modules that are installed but broken (e.g. numpy ABI); absent ones are just noise.
    skipped = "".join(f"; {r.name} skipped: {r.error}" for r in tried[: tried.index(working)]
                      if not (r.error or "").startswith("ModuleNotFoundError"))
    tpu = ", ".join(facts.edgetpu_devices)
    if model_is_edgetpu or accelerator == "edgetpu":
        missing = [what for what, ok in (("no Edge TPU device found", facts.edgetpu_devices),
                                         ("libedgetpu.so.1 not installed", facts.edgetpu_library),
                                         ("model is not compiled for the Edge TPU", model_is_edgetpu)) if not ok]
        if missing:
            # An edgetpu-compiled model cannot run without the delegate: its body is one custom op.
            raise RuntimeChoiceError(
                f"Edge TPU {'requested' if accelerator == 'edgetpu' else 'model'} but {', '.join(missing)}; "
                "use the non-Edge-TPU model or set runtime.accelerator: auto")
        if accelerator not in ("auto", "edgetpu"):
            raise RuntimeChoiceError(f"model is compiled for the Edge TPU and cannot run on '{accelerator}'")
        return RuntimeChoice("tflite", working.name, "edgetpu",
                             reason=f"tflite model → {working.name} with Edge TPU delegate ({tpu}){skipped}")
    if accelerator == "cpu":
        return RuntimeChoice("tflite", working.name, "cpu",
                             reason=f"tflite model → {working.name} on CPU (pinned by runtime.accelerator){skipped}")
    why = "Edge TPU present but model not compiled for it" if facts.has_edgetpu else "no Edge TPU found"
    return RuntimeChoice("tflite", working.name, "xnnpack",
                         reason=f"tflite model → {working.name} with XNNPACK ({why}){skipped}")


def _choose_onnx(facts: HardwareFacts, accelerator: str) -> RuntimeChoice:
    ort = facts.runtimes.get("onnxruntime")
    if ort is None or not ort.available:
        err = ort.error if ort else "runtimes were not probed"
        raise RuntimeChoiceError(f"onnxruntime is not usable ({err}); pip install onnxruntime")
    installed = ", ".join(ort.providers) or "none"
    if accelerator == "auto":
        best = next((p for p in ORT_PROVIDERS if p in ort.providers), ORT_PROVIDERS[-1])
    else:
        best = _PROVIDER_OF[accelerator]
        if best not in ort.providers:
            hint = "install onnxruntime-gpu" if accelerator != "cpu" else "reinstall onnxruntime"
            raise RuntimeChoiceError(
                f"accelerator '{accelerator}' requested but onnxruntime has no {best} "
                f"(installed providers: {installed}); {hint} or set runtime.accelerator: auto")
    below = ORT_PROVIDERS[ORT_PROVIDERS.index(best):]
    providers = tuple(p for p in below if p in ort.providers or p == ORT_PROVIDERS[-1])
    accel = _ACCEL_OF[best]
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


def choose_runtime(facts: HardwareFacts, model_format: str, backend: str = "auto", accelerator: str = "auto",
                   model_is_edgetpu: bool = False) -> RuntimeChoice:
    """Pick backend, module and accelerator for a model format; raise RuntimeChoiceError if impossible."""
    for what, value, allowed in (("model format", model_format, ("tflite", "onnx")),
                                 ("backend", backend, ("auto", "tflite", "onnxruntime")),
                                 ("accelerator", accelerator, ("auto", "cpu", "edgetpu", "cuda", "tensorrt"))):
        if value not in allowed:
            raise RuntimeChoiceError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    if model_format == "tflite":
        if backend == "onnxruntime":
            raise RuntimeChoiceError("onnxruntime cannot run .tflite files; convert the model to .onnx "
                                     "or set runtime.backend: auto")
        if accelerator in ("cuda", "tensorrt"):
            raise RuntimeChoiceError(f"accelerator '{accelerator}' needs an .onnx model on onnxruntime; "
                                     "TFLite models run on cpu or edgetpu (or set runtime.accelerator: auto)")
        return _choose_tflite(facts, accelerator, model_is_edgetpu)
    if backend == "tflite":
        raise RuntimeChoiceError("the TFLite backend cannot run .onnx files; convert the model to .tflite "
                                 "or set runtime.backend: auto")
    if accelerator == "edgetpu":
        raise RuntimeChoiceError("the Edge TPU runs only Edge TPU-compiled .tflite models, not .onnx; "
                                 "set runtime.accelerator: auto")
    return _choose_onnx(facts, accelerator)


# ---------------------------------------------------------------- report


def format_report(facts: HardwareFacts, choices: Mapping[str, RuntimeChoice | Exception] | None = None) -> str:
    """Multi-line text for ``agent-ctl probe``; computes auto choices for tflite and onnx when not given."""
    if choices is None:
        choices = {}
        for fmt in ("tflite", "onnx"):
            try:
                choices[fmt] = choose_runtime(facts, fmt)
            except RuntimeChoiceError as exc:
                choices[fmt] = exc
    unknown = "unknown"
    lines = [f"Platform:     {facts.platform} ({facts.arch})", f"Model:        {facts.model}"]
    if facts.soc:
        lines.append(f"SoC:          {TEGRA_SOCS.get(facts.soc, facts.soc)}")
    if facts.l4t_release:
        lines.append(f"L4T:          {facts.l4t_release}")
    lines.append(f"CPUs:         {facts.cpu_count or unknown}")
    lines.append(f"Memory:       {f'{facts.memory_mb} MB' if facts.memory_mb else unknown}")
    temps = ", ".join(f"{name} {c:.1f} °C" for name, c in facts.thermal)
    lines.append(f"Temperatures: {temps or 'none reported'}")
    if facts.throttled is not None:
        flags = ", ".join(facts.throttled.active_flags) or "none"
        lines.append(f"Throttled:    {hex(facts.throttled.raw)} ({flags})")
    tpu = ", ".join(facts.edgetpu_devices) or "no device"
    lines.append(f"Edge TPU:     {tpu}; libedgetpu {'found' if facts.edgetpu_library else 'missing'}")
    lines.append(f"GPU nodes:    {', '.join(facts.gpu_devices) or 'none'}")
    lines.append("Runtimes:" if facts.runtimes else "Runtimes:     not checked")
    for r in facts.runtimes.values():
        state = f"ok {r.version or ''}".rstrip() if r.available else f"unavailable ({r.error})"
        providers = f" [{', '.join(r.providers)}]" if r.providers else ""
        lines.append(f"  {r.name:<16} {state}{providers}")
    lines.append("Choice:")
    for fmt, choice in choices.items():
        text = choice.reason if isinstance(choice, RuntimeChoice) else f"error: {choice}"
        lines.append(f"  {fmt:<7} {text}")
    return "\n".join(lines)
