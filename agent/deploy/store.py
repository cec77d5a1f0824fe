"""On-disk model versions: content-addressed install, atomic activation, rollback and retention.

Layout: ``versions/<sha256>/{model.tflite|model.onnx, manifest.json[, model.yaml]}``; ``active.json`` =
``{"active": sha, "history": [older..., newest-previous], "updated": ts}``. rollback() activates previous()
and cuts history there: the version rolled back from is not pushed (a 2nd rollback goes further back) but
stays on disk. An unreadable record (bad JSON/types) makes active() None (warned) and prune() a no-op; a
valid one whose active version is gone from disk falls back to the newest installed history entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from agent.runtimes.registry import format_names
from agent.vocab import SHA256_PATTERN

log = logging.getLogger(__name__)
_SHA_RE = re.compile(SHA256_PATTERN)
_TMP = ".tmp-"  # prefix of everything half-written; the pid after it tells whose it is
# One lock for every store in the process, so one instance never cleans another's in-flight temp dir.
_LOCK = threading.RLock()


@dataclass(frozen=True)
class StoredModel:
    """One installed version: its model file, parsed manifest and directory."""

    sha256: str
    path: Path
    manifest: dict
    directory: Path

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or "model")

    @property
    def version(self) -> str:
        return str(self.manifest.get("version") or "0")


class StoreError(RuntimeError):
    """A store operation failed; the message names the operation and the path."""


def _is_sha(value: object) -> bool:
    return isinstance(value, str) and _SHA_RE.fullmatch(value) is not None


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename is only durable once its dir is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o640)
    _fsync(path)


class ModelStore:
    """Versions under ``root``; thread-safe (every operation holds the module-wide lock)."""

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        self.root, self.keep = Path(root), max(0, keep)
        self.versions, self.record = self.root / "versions", self.root / "active.json"
        for d in (self.root, self.versions):
            try:
                if not d.is_dir():
                    d.mkdir(mode=0o750, parents=True, exist_ok=True)
                    os.chmod(d, 0o750)  # exact mode regardless of the umask
            except OSError as e:
                raise StoreError(f"model store: cannot create {d}: {e}") from e
        self._clean_temps()

    def install(self, staged: Path, sha256: str, fmt: str, manifest: dict, model_yaml: str | None = None,
                ) -> StoredModel:
        """Move a verified staged file into versions/<sha256>/ atomically; idempotent per sha."""
        if not _is_sha(sha256):
            raise StoreError(f"model store: refusing sha256 {sha256!r} (want 64 lowercase hex chars)")
        if fmt not in format_names():
            raise StoreError(f"model store: refusing format {fmt!r} (want one of {format_names()})")
        staged, final = Path(staged), self.versions / sha256
        with _LOCK:
            if (existing := self.get(sha256)) is not None:
                staged.unlink(missing_ok=True)
                return existing
            tmp = self.versions / f"{_TMP}{os.getpid()}-{uuid.uuid4().hex}"
            try:
                body = json.dumps(manifest, indent=2, sort_keys=True).encode()
                with open(staged, "rb") as f:  # hash: the dir name must not lie; fsync: data before rename
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                    os.fsync(f.fileno())
                if digest != sha256:
                    raise ValueError(f"its sha256 is {digest}")
                if final.exists():  # ours appear whole, so this was damaged by hand or by the disk
                    log.warning("model store: replacing damaged version directory %s", final)
                    shutil.rmtree(final, ignore_errors=True)
                tmp.mkdir()
                os.chmod(tmp, 0o750)
                target = tmp / f"model.{fmt}"
                try:  # a hard link keeps `staged` intact until the install is complete
                    os.link(staged, target)
                except OSError:  # staging on another filesystem
                    shutil.copyfile(staged, target)
                    _fsync(target)
                os.chmod(target, 0o640)
                _write_file(tmp / "manifest.json", body)
                if model_yaml is not None:
                    _write_file(tmp / "model.yaml", model_yaml.encode())
                _fsync(tmp)
                os.replace(tmp, final)  # the version appears whole or not at all
                _fsync(self.versions)
            except (OSError, TypeError, ValueError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StoreError(f"model store: install of {staged} into {final} failed: {e}") from e
            staged.unlink(missing_ok=True)
            return StoredModel(sha256, final / target.name, json.loads(body), final)

    def relabel(self, sha256: str, manifest: dict, model_yaml: str | None = None) -> StoredModel:
        """Replace an installed version's manifest and model.yaml (same bytes deployed under a new name or version)."""
        existing = self.get(sha256)
        if existing is None:
            raise StoreError(f"model store: {sha256[:12]}… is not installed")
        with _LOCK:
            for name, data in (("manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode()),
                               ("model.yaml", model_yaml.encode() if model_yaml is not None else None)):
                if data is None:
                    continue
                tmp = existing.directory / f"{_TMP}{os.getpid()}-{uuid.uuid4().hex}"
                try:
                    _write_file(tmp, data)
                    os.replace(tmp, existing.directory / name)
                except OSError as e:
                    Path(tmp).unlink(missing_ok=True)
                    raise StoreError(f"model store: cannot update {existing.directory / name}: {e}") from e
            _fsync(existing.directory)
        return self.get(sha256)  # type: ignore[return-value]

    def get(self, sha256: str) -> StoredModel | None:
        """The installed version ``sha256``, or None if absent, malformed or unreadable."""
        directory = self.versions / str(sha256)
        paths = [directory / f"model.{f}" for f in format_names()] if _is_sha(sha256) else []
        if (path := next((p for p in paths if p.is_file()), None)) is None:
            return None
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            log.warning("model store: unreadable manifest in %s: %s", directory, e)
            return None
        return StoredModel(sha256=sha256, path=path, manifest=manifest, directory=directory)

    def _read(self) -> tuple[str, list[str]] | None:
        """(active sha, history) from the record; None when missing or unreadable (warned)."""
        try:
            data = json.loads(self.record.read_text())
            if not (isinstance(data, dict) and _is_sha(data.get("active"))
                    and isinstance(data.get("history"), list) and all(map(_is_sha, data["history"]))):
                raise ValueError("want {'active': sha256, 'history': [sha256, ...]}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("model store: unreadable active record %s, ignoring it: %s", self.record, e)
            return None
        return data["active"], data["history"]

    def _state(self) -> tuple[StoredModel | None, list[str]]:
        """(active, history older-first, distinct, on disk); a vanished active falls back down history."""
        if (rec := self._read()) is None:
            return None, []
        sha, history = rec
        history = [s for s in dict.fromkeys(reversed(history)) if s != sha and self.get(s)][::-1]
        model = self.get(sha)
        if model is None:
            log.warning("model store: active version %s is not on disk, falling back to history", sha)
            model = self.get(history.pop()) if history else None
        return model, history

    def _write(self, active: str, history: list[str]) -> None:
        """Replace the record atomically: temp file + fsync, os.replace, fsync the directory."""
        body = json.dumps({"active": active, "history": history, "updated": time.time()}).encode()
        tmp = self.root / f"{_TMP}{os.getpid()}-active-{uuid.uuid4().hex}"
        try:
            _write_file(tmp, body)
            os.replace(tmp, self.record)
            _fsync(self.root)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"model store: cannot write active record {self.record}: {e}") from e

    def activate(self, sha256: str) -> None:
        """Make an installed version active, pushing the current one onto history; then prune."""
        with _LOCK:
            if self.get(sha256) is None:
                raise StoreError(f"model store: cannot activate {sha256!r}: not installed in {self.versions}")
            current, history = self._state()
            self._write(sha256, [s for s in history + ([current.sha256] if current else []) if s != sha256])
            self.prune()

    def active(self) -> StoredModel | None:
        """The active version; None when the store is empty or its record unreadable."""
        with _LOCK:
            return self._state()[0]

    def previous(self) -> StoredModel | None:
        """What rollback() would activate: the newest distinct history entry still on disk."""
        with _LOCK:
            history = self._state()[1]
            return self.get(history[-1]) if history else None

    def rollback(self) -> StoredModel:
        """Activate previous(); the version rolled back from is not pushed (see module doc)."""
        with _LOCK:
            if (target := self.previous()) is None:
                raise StoreError("no previous version to roll back to")
            self._write(target.sha256, self._state()[1][:-1])
            return target

    def list(self) -> list[tuple[StoredModel, bool]]:
        """(model, is_active): active, then history newest first, then the rest newest install first."""
        with _LOCK:
            current, history = self._state()
            order = ([current.sha256] if current else []) + history[::-1]
            models = [m for s in order + self._others(order) if (m := self.get(s))]
            return [(m, current is not None and m.sha256 == current.sha256) for m in models]

    def prune(self) -> None:
        """Keep the active version, the ``keep`` newest history entries and the ``keep`` newest versions
        never in history (installed-not-yet-active or rolled back from: one may be about to go live)."""
        with _LOCK:
            self._clean_temps()
            current, history = self._state()
            if current is None:
                return  # no (trustworthy) record: deleting anything could delete what the daemon wants
            wanted = {current.sha256, *history[max(0, len(history) - self.keep):],
                      *self._others([current.sha256, *history])[:self.keep]}
            for p in self.versions.iterdir():
                if _is_sha(p.name) and p.name not in wanted:
                    log.info("model store: pruning old version %s", p.name)
                    shutil.rmtree(p, ignore_errors=True)

    def _others(self, exclude: list[str]) -> list[str]:
        """Installed shas not in ``exclude``, newest install first."""
        dirs = [p for p in self.versions.iterdir() if _is_sha(p.name) and p.name not in exclude]
        return [p.name for p in sorted(dirs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def _clean_temps(self) -> None:
        """Remove half-written installs/records left by a crash (never another live process's)."""
        with _LOCK:  # ours are never in flight while we hold the lock; another live pid's may be
            for p in [*self.root.glob(f"{_TMP}*"), *self.versions.glob(f"{_TMP}*")]:
                pid = p.name[len(_TMP):].split("-", 1)[0]
                if not pid.isdigit() or int(pid) == os.getpid() or not Path(f"/proc/{pid}").exists():
                    with suppress(OSError):
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
