"""A model file and what is written beside it: model.yaml (task, labels, preprocessing, decoding), labels files, the hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.vision.params import DecodeSettings, PreprocessSpec
from agent.vision.registry import check_task


class ModelManifest(BaseModel):
    """model.yaml: what the file alone cannot say (task, labels, how to feed it)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    version: str = "0"
    task: str | None = None
    labels: list[str] | None = None
    labels_file: str | None = None
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        return check_task(v)


class ManifestError(ValueError):
    """model.yaml or a labels file is unusable; the message names the file and the key."""


def read_manifest(model_path: Path) -> ModelManifest:
    """model.yaml beside the model (``<stem>.yaml`` wins over ``model.yaml``); defaults when absent."""
    found = _find_manifest(model_path)
    if found is None:
        return ModelManifest()
    path, data = found
    try:
        return ModelManifest.model_validate(data or {})
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        raise ManifestError(f"{path}: " + "; ".join(lines)) from None


def read_labels(path: Path) -> tuple[str, ...]:
    """One label per line; 'N label' and 'N: label' lines (TF label maps) are accepted too."""
    labels = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        head, _, rest = line.replace(":", " ", 1).partition(" ")
        labels.append(rest.strip() if head.isdigit() and rest.strip() else line)
    return tuple(labels)


def file_sha256(path: Path) -> str:
    """The file's sha256 as hex, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_path(model_path: Path) -> Path | None:
    """The model.yaml that belongs to ``model_path`` (see ``read_manifest``), or None."""
    found = _find_manifest(model_path)
    return found[0] if found else None


def _find_manifest(model_path: Path) -> tuple[Path, object] | None:
    """The model.yaml for ``model_path`` and its parsed YAML, read once.

    A ``<stem>.yaml`` with none of model.yaml's keys is someone else's file (Ultralytics ships its
    architecture as ``yolov8n.yaml`` beside ``yolov8n.onnx``): it is passed over for ``model.yaml``.
    """
    stem, shared = model_path.with_suffix(".yaml"), model_path.parent / "model.yaml"
    for candidate in dict.fromkeys((stem, shared)):  # one file when the model is model.<ext>
        if not candidate.is_file():
            continue
        try:
            # libyaml's loader when present: a tenth of the pure-Python one's time, and that time
            # is spent holding the GIL beside a running frame loop during a hot swap
            data = yaml.load(candidate.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as exc:
            raise ManifestError(f"{candidate}: not valid YAML ({exc})") from None
        if (candidate == stem and candidate != shared and isinstance(data, dict) and data
                and not set(data) & set(ModelManifest.model_fields)):
            continue
        return candidate, data
    return None


def declared_labels(model_path: Path, manifest: ModelManifest, labels_file: Path | None = None) -> tuple[str, ...]:
    """The labels a person gave: ``labels_file`` (model.labels, --labels), else model.yaml's ``labels``,
    else its ``labels_file`` (beside the model). Empty when none; labels inside the model file come after.
    """
    if labels_file is None and not manifest.labels and manifest.labels_file:
        labels_file = model_path.parent / manifest.labels_file
        if not labels_file.is_file():
            raise ManifestError(f"{manifest_path(model_path)}: labels_file: file not found: {labels_file}")
    if labels_file is not None:
        return read_labels(labels_file)
    return tuple(manifest.labels or ())
