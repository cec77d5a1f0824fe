"""Loading a model: its file and model.yaml, the backend the probe picks, the preprocessor and the task decoder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.inference.loaded import LoadedModel, ModelInfo
from agent.inference.modelfile import ManifestError, declared_labels, file_sha256, read_manifest
from agent.runtimes.base import RuntimeChoice
from agent.runtimes.registry import backend, detect_format
from agent.runtimes.session import open_session
from agent.vision import registry
from agent.vision.preprocess import Preprocessor


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
