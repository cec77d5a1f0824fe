"""TFLite backend: tflite_runtime, then ai_edge_litert, then tensorflow.lite; XNNPACK or Edge TPU."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import logging
import types
import warnings
import zipfile
from pathlib import Path
from types import ModuleType

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
    quiet_stderr,
)

log = logging.getLogger(__name__)

# The import order is the preference order: the slim Pi wheel first, then its successor, then full TF.
# The probe and status name the packages; the session imports their interpreter modules.
PACKAGES = ("tflite_runtime", "ai_edge_litert", "tensorflow.lite")
MODULES = tuple(p if p == "tensorflow.lite" else f"{p}.interpreter" for p in PACKAGES)
PIP_NAMES = {"tflite_runtime": "tflite-runtime", "ai_edge_litert": "ai-edge-litert", "tensorflow.lite": "tensorflow"}
EDGETPU_LIBRARY = "libedgetpu.so.1"


def module_path(name: str) -> str:
    """'ai_edge_litert' -> 'ai_edge_litert.interpreter' (the probe names packages, we import modules)."""
    return name if name in MODULES else f"{name}.interpreter"


def import_interpreter_module(name: str) -> ModuleType:
    """The module with ``Interpreter`` and ``load_delegate`` for package or module ``name``."""
    if module_path(name) == "tensorflow.lite":
        # importlib gives tensorflow's source package here, not the public tf.lite API.
        import tensorflow as tf

        return types.SimpleNamespace(Interpreter=tf.lite.Interpreter,  # type: ignore[return-value]
                                     load_delegate=tf.lite.experimental.load_delegate,
                                     OpResolverType=tf.lite.experimental.OpResolverType)  # safe mode's
    return importlib.import_module(module_path(name))


def load_tflite_module(only: str | None = None) -> ModuleType:
    """The first TFLite module that imports (``only`` restricts the choice to one module name)."""
    errors = []
    for name in (only,) if only else MODULES:
        try:
            return import_interpreter_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not this one"
            errors.append(f"{name}: {exc}")
    raise RuntimeUnavailable("no TFLite runtime imports (" + "; ".join(errors) + "); pip install 'edge-agent[tflite]'")


def embedded_labels(path: str | Path) -> tuple[str, ...]:
    """Labels packed in a TFLite file's metadata (its associated files are a zip appended to the model)."""
    try:
        if not zipfile.is_zipfile(path):
            return ()
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.lower().endswith(".txt") and "label" in n.lower()]
            if not names:
                return ()
            text = zf.read(names[0]).decode("utf-8", "replace")
    except (OSError, zipfile.BadZipFile):
        return ()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _spec(detail: dict) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorSpec(
        name=detail["name"],
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]),
        scale=float(scale),
        zero_point=int(zero_point),
    )


class TFLiteSession:
    """A TFLite interpreter behind the common session interface."""

    def __init__(self, path: str | Path, *, module: str | None = None, threads: int = 0, edgetpu: bool = False,
                 xnnpack: bool = True):
        path = str(path)
        errors: list[str] = []
        for name in (module,) if module else MODULES:
            try:
                mod = import_interpreter_module(name)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{name}: import failed ({exc})")
                continue
            try:
                delegates = [mod.load_delegate(EDGETPU_LIBRARY)] if edgetpu else None
                interp = mod.Interpreter(
                    model_path=path, num_threads=threads or None, experimental_delegates=delegates,
                    **({} if xnnpack else _without_xnnpack(mod)),
                )
                interp.allocate_tensors()
            except ValueError as exc:
                # A ValueError from the constructor is the model's fault on every module: stop here.
                if "Could not open" in str(exc) or "Model provided has model identifier" in str(exc):
                    raise ModelLoadError(f"{path}: not a loadable TFLite model ({exc})") from exc
                errors.append(f"{name}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. tflite-runtime 2.14 under numpy 2
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            self._interp = interp
            self.info = SessionInfo(
                backend="tflite",
                accelerator="edgetpu" if edgetpu else "xnnpack" if xnnpack else "cpu",
                module=name.split(".")[0] if name != "tensorflow.lite" else name,
                notes=() if xnnpack else ("XNNPACK off",),
            )
            if errors:
                log.info("TFLite: using %s after: %s", name, "; ".join(errors))
            break
        else:
            raise RuntimeUnavailable("no TFLite runtime could load the model: " + "; ".join(errors))
        self._in_idx = [d["index"] for d in interp.get_input_details()]
        self._out_idx = [d["index"] for d in interp.get_output_details()]
        self.inputs = tuple(_spec(d) for d in interp.get_input_details())
        self.outputs = tuple(_spec(d) for d in interp.get_output_details())
        self.reuses_outputs = False  # get_tensor() returns a copy
        labels = embedded_labels(path)
        self.metadata: dict[str, str] = {"labels": "\n".join(labels)} if labels else {}

    def input_view(self, i: int = 0) -> np.ndarray:
        """The interpreter's own input buffer, to preprocess into without a copy.

        Valid until the next ``run``; do not keep it across calls.
        """
        return self._interp.tensor(self._in_idx[i])()

    def run(self, inputs: list[np.ndarray] | None) -> list[np.ndarray]:
        """Infer; ``None`` means the inputs were already written through ``input_view``."""
        interp = self._interp
        if inputs is not None:
            for idx, arr in zip(self._in_idx, inputs, strict=True):
                interp.set_tensor(idx, arr)
        interp.invoke()
        return [interp.get_tensor(idx) for idx in self._out_idx]

    def close(self) -> None:
        self._interp = None  # type: ignore[assignment]


# -- availability ----------------------------------------------------------------------------------

def probe_model_path() -> Path:
    """The bundled model a module must really load before it counts as working."""
    return Path(__file__).resolve().parents[2] / "models/face/blazeface.tflite"


def _without_xnnpack(mod) -> dict:
    """Interpreter(...) keywords for TFLite's built-in kernels without its default delegate, XNNPACK."""
    return {"experimental_op_resolver_type": mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}


def _load_with(name: str, xnnpack: bool = True) -> str | None:
    """Import package ``name``, build an interpreter on the bundled model if present; return its version."""
    mod = import_interpreter_module(name)
    top = "tensorflow" if name == "tensorflow.lite" else name
    version = getattr(importlib.import_module(top), "__version__", None)
    # Importing is not enough: tflite-runtime 2.14 imports under numpy 2 but fails here.
    if probe_model_path().is_file():
        extra = {} if xnnpack else _without_xnnpack(mod)
        interp = mod.Interpreter(model_path=str(probe_model_path()), **extra)
        interp.allocate_tensors()
        interp.invoke()  # XNNPACK's kernels run only here (a CPU it misreads crashes here, not above)
    return version


@functools.cache
def check_module(name: str, xnnpack: bool = True) -> RuntimeAvailability:
    """Whether TFLite package ``name`` imports and really builds and runs an interpreter (never raises)."""
    try:
        with warnings.catch_warnings(), quiet_stderr():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter warns that it is deprecated
            version = _load_with(name, xnnpack)
    except Exception as exc:
        return RuntimeAvailability(name, False, error=error_text(exc))
    if version is None:
        try:
            version = importlib.metadata.version(PIP_NAMES[name])
        except importlib.metadata.PackageNotFoundError:
            pass
    return RuntimeAvailability(name, True, version=version)


def is_edgetpu_model(path: str | Path) -> bool:
    """True when the model was compiled by edgetpu_compiler (it embeds the custom op name)."""
    try:
        return b"edgetpu-custom-op" in Path(path).read_bytes()
    except OSError:
        return False


# -- choice --------------------------------------------------------------------------------------

def choose(facts: HardwareFacts, accelerator: str, compiled_for: str | None) -> RuntimeChoice:
    """The first working TFLite package; the Edge TPU delegate for a model compiled for it, else XNNPACK."""
    if accelerator in ("cuda", "tensorrt"):
        raise RuntimeChoiceError(f"accelerator '{accelerator}' needs an .onnx model on onnxruntime; "
                                 "TFLite models run on cpu or edgetpu (or set runtime.accelerator: auto)")
    model_is_edgetpu = compiled_for == "edgetpu"
    tried = [facts.runtimes[n] for n in PACKAGES if n in facts.runtimes]
    working = next((r for r in tried if r.available), None)
    if working is None:
        detail = "; ".join(f"{r.name}: {r.error}" for r in tried) or "runtimes were not probed"
        raise RuntimeChoiceError(
            f"no working TFLite runtime (tried {', '.join(PACKAGES)}: {detail}); "
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


# -- the backend ---------------------------------------------------------------------------------

class TFLiteBackend:
    """TFLite models on tflite_runtime, ai_edge_litert or tensorflow.lite; XNNPACK or the Edge TPU delegate."""

    name = "tflite"
    label = "the TFLite backend"
    rank = 10
    modules = PACKAGES
    safe_mode = "XNNPACK off"
    # TFLite flatbuffers carry the file identifier 'TFL3' at bytes 4-8.
    formats = (ModelFormat("tflite", "TFLite", ".tflite", lambda head: len(head) >= 8 and head[4:8] == b"TFL3"),)

    def availability(self, first_only: bool, safe: bool = False) -> dict[str, RuntimeAvailability]:
        found: dict[str, RuntimeAvailability] = {}
        for name in PACKAGES:
            found[name] = check_module(name, xnnpack=not safe)
            if first_only and found[name].available:
                break
        return found

    def preload(self, facts: HardwareFacts) -> list[str]:
        # Only the module that works here: importing a broken one (tflite_runtime under numpy 2) would
        # print a page of numpy's C-level warnings into the journal. Full TensorFlow is never preloaded.
        return [module_path(n) for n in PACKAGES[:2]
                if facts.runtimes.get(n) is not None and facts.runtimes[n].available][:1]

    def compiled_for(self, path: Path) -> str | None:
        return "edgetpu" if is_edgetpu_model(path) else None

    def choose(self, facts: HardwareFacts, accelerator: str, compiled_for: str | None) -> RuntimeChoice:
        return choose(facts, accelerator, compiled_for)

    def safe_choice(self, choice: RuntimeChoice) -> RuntimeChoice | None:
        if choice.safe:
            return None
        accelerator = "edgetpu" if choice.accelerator == "edgetpu" else "cpu"
        on = "with the Edge TPU delegate" if accelerator == "edgetpu" else "on CPU"
        return dataclasses.replace(choice, accelerator=accelerator, safe=True,
                                   reason=f"tflite model → {choice.module} {on}, XNNPACK off")

    def open(self, path: Path, choice: RuntimeChoice, *, threads: int, cache_dir: Path | None,
             model_sha256: str) -> Session:
        return TFLiteSession(path, module=choice.module or None, threads=threads,
                             edgetpu=choice.accelerator == "edgetpu", xnnpack=not choice.safe)

    def embedded_labels(self, path: Path) -> tuple[str, ...]:
        return embedded_labels(path)


BACKEND = TFLiteBackend()
