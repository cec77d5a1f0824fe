"""TFLite backend: tflite_runtime, then ai_edge_litert, then tensorflow.lite; XNNPACK or Edge TPU."""

from __future__ import annotations

import importlib
import logging
import types
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np

from agent.runtimes.base import ModelLoadError, RuntimeUnavailable, SessionInfo, TensorSpec

log = logging.getLogger(__name__)

# The import order is the preference order: the slim Pi wheel first, then its successor, then full TF.
MODULES = ("tflite_runtime.interpreter", "ai_edge_litert.interpreter", "tensorflow.lite")
EDGETPU_LIBRARY = "libedgetpu.so.1"


def module_path(name: str) -> str:
    """'ai_edge_litert' -> 'ai_edge_litert.interpreter' (the probe names packages, we import modules)."""
    return name if name in MODULES else f"{name}.interpreter"


def _import(name: str) -> ModuleType:
    if module_path(name) == "tensorflow.lite":
        # importlib gives tensorflow's source package here, not the public tf.lite API.
        import tensorflow as tf

        return types.SimpleNamespace(Interpreter=tf.lite.Interpreter,  # type: ignore[return-value]
                                     load_delegate=tf.lite.experimental.load_delegate)
    return importlib.import_module(module_path(name))


def load_tflite_module(only: str | None = None) -> ModuleType:
    """The first TFLite module that imports (``only`` restricts the choice to one module name)."""
    errors = []
    for name in (only,) if only else MODULES:
        try:
            return _import(name)
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

    def __init__(self, path: str | Path, *, module: str | None = None, threads: int = 0, edgetpu: bool = False):
        path = str(path)
        errors: list[str] = []
        for name in (module,) if module else MODULES:
            try:
                mod = _import(name)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{name}: import failed ({exc})")
                continue
            try:
                delegates = [mod.load_delegate(EDGETPU_LIBRARY)] if edgetpu else None
                interp = mod.Interpreter(
                    model_path=path, num_threads=threads or None, experimental_delegates=delegates
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
                accelerator="edgetpu" if edgetpu else "xnnpack",
                module=name.split(".")[0] if name != "tensorflow.lite" else name,
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
