"""The steps between a downloaded file and an installed model: verify it, validate it in a child, describe it.

Each step takes the manifest and paths and raises (TransferError, ManifestRejected, ValidationFailed)
with a reason a person can act on; none touches the running model.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import yaml

from agent.deploy.manifest import DeploymentManifest, ManifestRejected
from agent.deploy.store import ModelStore, StoredModel
from agent.deploy.transfer import TransferError
from agent.deploy.validate import validate_in_child
from agent.inference.loaded import ModelInfo
from agent.inference.modelfile import file_sha256, manifest_path
from agent.runtimes.registry import detect_format


def verify(staged: Path, m: DeploymentManifest) -> None:
    """The staged bytes are the manifest's: size, sha256 and format. Bad bytes are deleted, not resumed."""
    spec = m.model
    size = staged.stat().st_size
    if size != spec.size:
        raise TransferError(f"staged file has {size} bytes, the manifest says {spec.size}")
    digest = file_sha256(staged)
    if digest != spec.sha256:
        staged.unlink(missing_ok=True)  # a resumed transfer must not keep bad bytes
        (staged.parent / f"{m.deployment_id}.have").unlink(missing_ok=True)
        raise TransferError(f"sha256 mismatch: got {digest[:12]}…, the manifest says {spec.sha256[:12]}…")
    try:
        fmt = detect_format(staged)
    except ValueError as exc:
        raise ManifestRejected(f"not a model file: {exc}") from None
    if fmt != spec.format:
        raise ManifestRejected(f"the file is a {fmt} model; the manifest says {spec.format}")


def validate(staged: Path, m: DeploymentManifest, raw: dict, staging: Path, *, backend: str, accelerator: str,
             timeout: float) -> None:
    """Load and run the model in a child process, beside the model.yaml the manifest makes; ValidationFailed if not."""
    workdir = staging / f"{m.deployment_id}.check"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        check_path = workdir / f"model.{m.model.format}"
        if check_path.exists():
            check_path.unlink()
        try:  # the child loads it from here, beside its model.yaml
            os.link(staged, check_path)
        except OSError:  # staging on another filesystem
            shutil.copyfile(staged, check_path)
        (workdir / "model.yaml").write_text(model_yaml(m))
        validate_in_child(check_path, raw, backend=backend, accelerator=accelerator, timeout=timeout)
    finally:
        for p in workdir.iterdir():
            p.unlink()
        workdir.rmdir()


def model_yaml(m: DeploymentManifest) -> str:
    """The model.yaml stored beside a deployed model, so the loader finds its task, labels and preprocess."""
    doc: dict = {"name": m.model.name, "version": m.model.version, "task": m.model.task}
    if m.model.labels:
        doc["labels"] = m.model.labels
    if m.model.preprocess:
        doc["preprocess"] = m.model.preprocess.model_dump(mode="json", exclude_unset=True)
    if m.model.decode:
        doc["decode"] = m.model.decode.model_dump(mode="json", exclude_unset=True)
    return yaml.safe_dump(doc, sort_keys=False)


def stored_manifest(m: DeploymentManifest, raw: dict) -> dict:
    """What the model store keeps about a deployed model (its manifest.json)."""
    return {"deployment_id": m.deployment_id, **m.model.model_dump(mode="json", exclude={"labels"}),
            "installed": time.time(), "signed": bool(raw.get("signature"))}


def install(store: ModelStore, staged: Path, m: DeploymentManifest, raw: dict, *, staged_is_installed: bool
            ) -> StoredModel:
    """Put the validated model in the store (or relabel the stored copy of the same bytes)."""
    spec = m.model
    if store.get(spec.sha256) is not None:  # same bytes, maybe new name, version, labels or preprocessing
        stored = store.relabel(spec.sha256, stored_manifest(m, raw), model_yaml(m))
        if not staged_is_installed:
            staged.unlink(missing_ok=True)
        return stored
    return store.install(staged, spec.sha256, spec.format, stored_manifest(m, raw), model_yaml(m))


def install_baseline(store: ModelStore, current: ModelInfo, staging: Path) -> None:
    """Put the model running now into the store, so the first deployment has something to roll back to."""
    if store.active() is not None:
        return
    path = Path(current.path)
    manifest = {"name": current.name, "version": current.version, "format": current.format,
                "task": current.task, "sha256": current.sha256, "origin": "configured"}
    yaml_path = manifest_path(path)
    tmp = staging / f"baseline-{current.sha256[:12]}"
    tmp.write_bytes(path.read_bytes())
    stored = store.install(tmp, current.sha256, current.format, manifest, yaml_path.read_text() if yaml_path else None)
    store.activate(stored.sha256)
