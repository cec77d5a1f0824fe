"""ModelStore contracts on real files: atomic activation, rollback, retention, crash leftovers, kill -9."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.deploy.store import ModelStore, StoredModel, StoreError

REPO = Path(__file__).resolve().parent.parent
TFLITE = REPO / "models" / "face" / "blazeface.tflite"
ONNX = REPO / "models" / "face" / "blazeface.onnx"
YAML = (REPO / "models" / "face" / "model.yaml").read_text()


def stage(tmp_path: Path, src: Path = TFLITE, variant: int = 0) -> tuple[Path, str, str]:
    """Copy a real model into a staging file; ``variant`` appends bytes so each version has its own sha."""
    data = src.read_bytes() + (f"\0variant {variant}".encode() if variant else b"")
    staged = tmp_path / "staging" / f"{src.name}.{variant}.part"
    staged.parent.mkdir(exist_ok=True)
    staged.write_bytes(data)
    return staged, hashlib.sha256(data).hexdigest(), src.suffix[1:]


def install(store: ModelStore, tmp_path: Path, variant: int = 0, src: Path = TFLITE) -> StoredModel:
    staged, sha, fmt = stage(tmp_path, src, variant)
    return store.install(staged, sha, fmt, {"name": "face", "version": f"1.{variant}"}, YAML)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for d in (root, root / "versions") for p in d.glob(".tmp-*"))


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_install_then_activate_records_the_active_version_atomically(tmp_path, monkeypatch):
    root = tmp_path / "models"
    store = ModelStore(root)
    m = install(store, tmp_path)
    assert m.path == root / "versions" / m.sha256 / "model.tflite" and sha_of(m.path) == m.sha256
    assert (m.directory / "model.yaml").read_text() == YAML
    assert json.loads((m.directory / "manifest.json").read_text()) == m.manifest
    assert (m.name, m.version) == ("face", "1.0")
    for d in (root, root / "versions", m.directory):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750
    for f in ("model.tflite", "manifest.json", "model.yaml"):
        assert stat.S_IMODE((m.directory / f).stat().st_mode) == 0o640
    assert store.active() is None  # installed is not active

    events: list[tuple[str, str]] = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    store.activate(m.sha256)
    record = str(root / "active.json")
    i = events.index(("replace", record))
    assert events[i - 1][0] == "fsync" and Path(events[i - 1][1]).name.startswith(".tmp-")  # data first
    assert events[i + 1] == ("fsync", str(root))  # then the rename itself
    data = json.loads((root / "active.json").read_text())
    assert data["active"] == m.sha256 and data["history"] == [] and isinstance(data["updated"], float)
    assert stat.S_IMODE((root / "active.json").stat().st_mode) == 0o640
    assert ModelStore(root).active() == m and leftovers(root) == []


def test_power_cut_during_activation_leaves_old_or_new_active(tmp_path, monkeypatch):
    root = tmp_path / "models"
    store = ModelStore(root)
    a, b = install(store, tmp_path, src=TFLITE), install(store, tmp_path, src=ONNX)
    store.activate(a.sha256)
    real_replace = os.replace

    def cut(src, dst):
        if Path(dst).name == "active.json":
            raise OSError(5, "Input/output error (power cut)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(StoreError, match="active record"):
        store.activate(b.sha256)
    monkeypatch.setattr(os, "replace", real_replace)
    assert store.active() == a and leftovers(root) == []

    # A temp record half-written by a process that died must never count, and is cleaned on open.
    dead = root / ".tmp-999999999-active-x"
    dead.write_text(json.dumps({"active": b.sha256, "history": [a.sha256], "updated": 1.0})[:20])
    assert store.active() == a
    assert ModelStore(root).active() == a and leftovers(root) == []
    store.activate(b.sha256)
    assert store.active() == b and store.previous() == a


def test_rollback_goes_to_the_previous_version_and_further_back_on_repeat(tmp_path):
    store = ModelStore(tmp_path / "models")
    v = [install(store, tmp_path, variant=i) for i in range(1, 5)]
    with pytest.raises(StoreError, match="no previous version"):
        store.rollback()
    for m in v:
        store.activate(m.sha256)
    assert store.previous() == v[2]
    assert store.rollback() == v[2] and store.active() == v[2]
    assert store.rollback() == v[1] and store.active() == v[1]  # further back, not forth to v[3]
    assert store.rollback() == v[0] and store.active() == v[0]
    assert store.previous() is None
    with pytest.raises(StoreError, match="no previous version to roll back to"):
        store.rollback()
    # The rolled-back-from versions stay on disk (not active, not in history) until the next prune.
    assert all(store.get(m.sha256) == m for m in v)
    assert [(m.sha256, act) for m, act in store.list()][0] == (v[0].sha256, True)
    store.activate(v[3].sha256)  # re-activating a rolled-back-from version works without a re-install
    assert store.active() == v[3] and store.previous() == v[0]


def test_retention_keeps_active_plus_three_previous(tmp_path):
    root = tmp_path / "models"
    store = ModelStore(root)
    v = []
    for i in range(1, 7):  # the daemon's flow: each pushed version is installed, then activated
        v.append(install(store, tmp_path, variant=i))
        store.activate(v[-1].sha256)
    on_disk = {p.name for p in (root / "versions").iterdir()}
    assert on_disk == {m.sha256 for m in v[2:]}  # v6 active + v3..v5 for rollback
    assert [(m.sha256, act) for m, act in store.list()] == [(v[5].sha256, True)] + [
        (m.sha256, False) for m in reversed(v[2:5])]
    assert [m.sha256 for m in v[2:5]] == json.loads((root / "active.json").read_text())["history"][-3:]

    # Installed but never activated: the newest `keep` survive a prune (one may be about to go live).
    pending = [install(store, tmp_path, variant=i) for i in range(10, 14)]
    for age, m in enumerate(reversed(pending)):
        os.utime(m.directory, (time.time() - 100 * age, time.time() - 100 * age))
    store.prune()
    assert {m.sha256 for m in pending if store.get(m.sha256)} == {m.sha256 for m in pending[1:]}
    assert {p.name for p in (root / "versions").iterdir()} == on_disk | {m.sha256 for m in pending[1:]}

    small = ModelStore(root, keep=1)
    small.prune()
    assert {p.name for p in (root / "versions").iterdir()} == {v[5].sha256, v[4].sha256, pending[-1].sha256}


def test_list_puts_installed_but_never_active_versions_last(tmp_path):
    store = ModelStore(tmp_path / "models")
    a, b, c = (install(store, tmp_path, variant=i) for i in (1, 2, 3))
    store.activate(a.sha256)
    store.activate(b.sha256)
    c = install(store, tmp_path, variant=3)
    assert store.list() == [(b, True), (a, False), (c, False)]


def test_corrupt_active_record_gives_none_not_a_crash(tmp_path, caplog):
    root = tmp_path / "models"
    store = ModelStore(root)
    a, b = install(store, tmp_path, variant=1), install(store, tmp_path, variant=2)
    record = root / "active.json"
    bad = [b"\x00\xff garbage", b'{"active": "' + a.sha256.encode()[:30], b"[]", b"{}",
           json.dumps({"active": "../../etc", "history": []}).encode(),
           json.dumps({"active": a.sha256, "history": "nope"}).encode(),
           json.dumps({"active": a.sha256, "history": [a.sha256.upper()]}).encode()]
    for body in bad:
        record.write_bytes(body)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="agent.deploy.store"):
            assert store.active() is None and store.previous() is None, body
        assert "unreadable active record" in caplog.text
        store.prune()  # an untrustworthy record must not get versions deleted
        assert store.get(a.sha256) == a and store.get(b.sha256) == b
    assert ModelStore(root).active() is None
    # A valid record whose active version vanished: fall back to the newest installed history entry.
    record.write_text(json.dumps({"active": "0" * 64, "history": [a.sha256, b.sha256], "updated": 0}))
    assert store.active() == b and store.previous() == a
    record.write_text(json.dumps({"active": "0" * 64, "history": [], "updated": 0}))
    assert store.active() is None
    store.activate(a.sha256)  # the daemon can always recover by activating something
    assert store.active() == a


def test_bad_sha_or_format_is_refused(tmp_path):
    root = tmp_path / "models"
    store = ModelStore(root)
    staged, sha, fmt = stage(tmp_path)
    for bad in ("../../etc", sha.upper(), sha[:63], sha[:32], sha + "0", "/" + sha[1:], "", sha[:-1] + "g"):
        with pytest.raises(StoreError, match="refusing sha256"):
            store.install(staged, bad, fmt, {})
        assert store.get(bad) is None
        with pytest.raises(StoreError, match="not installed"):
            store.activate(bad)
    for bad_fmt in ("exe", "../tflite", "TFLITE", ""):
        with pytest.raises(StoreError, match="refusing format"):
            store.install(staged, sha, bad_fmt, {})
    with pytest.raises(StoreError, match="its sha256 is"):  # a sha that doesn't match the bytes
        store.install(staged, hashlib.sha256(b"other").hexdigest(), fmt, {})
    with pytest.raises(StoreError, match="install of"):
        store.install(staged, sha, fmt, {"not json": object()})
    assert staged.exists() and list((root / "versions").iterdir()) == []
    assert not (tmp_path / "etc").exists()


def test_interrupted_install_leftovers_are_cleaned(tmp_path, monkeypatch):
    root = tmp_path / "models"
    store = ModelStore(root)
    staged, sha, fmt = stage(tmp_path)
    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the final rename of the built directory fails
        m.setattr(os, "replace", disk_full)
        with pytest.raises(StoreError, match=f"install of {staged}"):
            store.install(staged, sha, fmt, {})
    assert leftovers(root) == [] and store.get(sha) is None and sha_of(staged) == sha  # download kept

    # What a crash (kill -9, power cut) leaves: temp dirs/records of dead processes, odd names.
    crashed = root / "versions" / ".tmp-999999999-abc"
    crashed.mkdir()
    (crashed / "model.tflite").write_bytes(b"half")
    (root / ".tmp-999999999-active-def").write_text("{")
    (root / "versions" / ".tmp-junk").write_text("x")
    live = root / "versions" / f".tmp-{os.getppid()}-busy"  # another live process may be installing
    live.mkdir()
    store = ModelStore(root)
    assert leftovers(root) == [live.name]
    m = store.install(staged, sha, fmt, {})
    (root / "versions" / ".tmp-999999999-xyz").mkdir()
    store.activate(m.sha256)  # prune cleans too
    assert leftovers(root) == [live.name] and store.active() == m


def test_install_is_idempotent(tmp_path):
    store = ModelStore(tmp_path / "models")
    first = install(store, tmp_path, src=ONNX)
    inode = first.path.stat().st_ino
    staged, sha, fmt = stage(tmp_path, ONNX)
    again = store.install(staged, sha, fmt, {"name": "other"})
    assert again == first and again.path.stat().st_ino == inode and not staged.exists()
    assert again.path.name == "model.onnx" and again.name == "face"
    store.activate(sha)
    store.activate(sha)  # re-activating the active one does not put it in its own history
    assert store.previous() is None and store.active() == first


def test_get_of_a_damaged_version_is_none_and_reinstall_repairs_it(tmp_path):
    store = ModelStore(tmp_path / "models")
    m = install(store, tmp_path)
    (m.directory / "manifest.json").write_text("[1, 2]")
    assert store.get(m.sha256) is None
    assert install(store, tmp_path).manifest == {"name": "face", "version": "1.0"}


CHILD = """
import sys
from agent.deploy.store import ModelStore
store, a, b = ModelStore(sys.argv[1]), sys.argv[2], sys.argv[3]
print("ready", flush=True)
while True:
    store.activate(a)
    store.activate(b)
"""


def test_kill_9_during_activations_leaves_a_or_b_active(tmp_path):
    root = tmp_path / "models"
    store = ModelStore(root)
    a, b = install(store, tmp_path, src=TFLITE), install(store, tmp_path, src=ONNX)
    store.activate(a.sha256)
    store.activate(b.sha256)  # from here on every record names one active and the other previous
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random()
    updates = set()
    for _ in range(6):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), a.sha256, b.sha256],
                                 stdout=subprocess.PIPE, cwd=REPO, env=env)
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.05))
        child.kill()  # SIGKILL: no cleanup, no flush, at an arbitrary instruction
        child.wait(5)
        child.stdout.close()
        reopened = ModelStore(root)
        active = reopened.active()
        assert active in (a, b) and active is not None and sha_of(active.path) == active.sha256
        previous = reopened.previous()
        assert previous is not None and {active.sha256, previous.sha256} == {a.sha256, b.sha256}
        assert leftovers(root) == []
        updates.add(json.loads((root / "active.json").read_text())["updated"])
    assert child.returncode == -9 and len(updates) > 1  # the child really was switching models
