"""Loading a model: its file and model.yaml, the backend the probe picks, the preprocessor and the task decoder."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from agent.inference.loaded import LoadedModel, ModelInfo
from agent.inference.modelfile import ManifestError, declared_labels, file_sha256, read_manifest
from agent.runtimes.base import ModelLoadError, RuntimeChoice
from agent.runtimes.isolated import ChildCrashed, in_child
from agent.runtimes.registry import backend, detect_format
from agent.runtimes.session import open_session
from agent.vision import registry
from agent.vision.preprocess import Preprocessor

log = logging.getLogger(__name__)
TRIAL_TIMEOUT_S = 90.0  # under the unit's TimeoutStartSec (120 s), with room for the real load after it


def load_model(path: Path, choose: Callable[[str], RuntimeChoice], *, task: str | None = None, labels_file: Path | None = None,
               threshold: float | None = None, threads: int = 0, cache_dir: Path | None = None,
               name: str | None = None, version: str | None = None) -> LoadedModel:
    """Read the manifest, pick the backend (``choose(format) -> RuntimeChoice``), load, warm up."""
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    fmt = detect_format(path)
    manifest = read_manifest(path)
    task = task or manifest.task
    if task is None:
        raise ManifestError(f"{path}: no task given; set model.task in the config or task: in model.yaml")
    decoding = registry.task(task)
    settings = manifest.decode.model_copy(update={"threshold": threshold} if threshold is not None else {})
    labels = declared_labels(path, manifest, labels_file)
    sha = file_sha256(path)
    choice = choose(fmt)
    session = open_session(path, choice, threads=threads, cache_dir=cache_dir, model_sha256=sha)
    try:
        labels = labels or backend(choice.backend).embedded_labels(path)
        pre = manifest.preprocess
        names, size = decoding.hints(session.metadata)
        labels = labels or names or ()
        if pre.size is None and size and any(d < 0 for d in session.inputs[0].shape):
            pre = pre.model_copy(update={"size": size})
        preprocessor = Preprocessor(session.inputs[0], pre)
        decoder = decoding.bind(list(session.outputs), settings.params(labels))
    except Exception:
        session.close()
        raise
    info = ModelInfo(name=name or manifest.name or path.stem, version=version or manifest.version,
                     sha256=sha, format=fmt, task=task, path=str(path))
    return LoadedModel(info, session, preprocessor, decoder, choice)


def reopen(model: LoadedModel, choice: RuntimeChoice, *, threads: int = 0, cache_dir: Path | None = None) -> LoadedModel:
    """The same model on a new session made with ``choice`` (e.g. spin-waiting changed), warmed up.

    Preprocessing and decoding are the old model's own objects: frames prepared for one feed the other.
    """
    session = open_session(Path(model.info.path), choice, threads=threads, cache_dir=cache_dir,
                           model_sha256=model.info.sha256)
    return LoadedModel(model.info, session, model.preprocessor, model.decoder, choice)


def load_checked(path: Path, choose: Callable[[str], RuntimeChoice], **kw) -> LoadedModel:
    """``load_model``, after the same load and warm-up in a forked child.

    A runtime or delegate that crashes or hangs there (the Edge TPU's, XNNPACK on a CPU it misreads)
    takes the child down, not the daemon: the model is tried again in its backend's safe mode and,
    when that works, loaded so with the reason in ``choice.reason`` (status shows it). Ordinary load
    errors are left to the real load, which raises them with all their detail.
    """
    def trial(pick: Callable[[str], RuntimeChoice]) -> None:
        logging.disable(logging.INFO)  # in the child only: the real load below logs what it does
        load_model(path, pick, **kw).close()

    try:
        in_child(lambda: trial(choose), timeout=TRIAL_TIMEOUT_S, what=f"loading {path.name}")
    except ChildCrashed as crash:
        choice = choose(detect_format(path))
        picked = backend(choice.backend)
        safe = picked.safe_choice(choice) if hasattr(picked, "safe_choice") else None
        if safe is None:
            raise ModelLoadError(f"{path}: {crash}, and {picked.label} has no safer mode to try") from None
        safe = dataclasses.replace(safe, reason=f"{safe.reason} ({crash} on {choice.accelerator})")
        log.error("%s; trying %s", crash, picked.safe_mode)
        try:
            in_child(lambda: trial(lambda _fmt: safe), timeout=TRIAL_TIMEOUT_S,
                     what=f"loading {path.name} with {picked.safe_mode}")
        except ChildCrashed as again:
            raise ModelLoadError(f"{path}: {crash}; {again}") from None
        except Exception:  # noqa: BLE001 - left to the real load below
            pass
        choose = lambda _fmt: safe  # noqa: E731
    except Exception:  # noqa: BLE001 - left to the real load below
        pass
    return load_model(path, choose, **kw)
