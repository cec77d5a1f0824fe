"""Contracts of the durable outbox, on real files: crash survival, order, size bound, disk full."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agent.messaging.outbox import CONTROL, ROW_OVERHEAD, Outbox, OutboxError

REPO = Path(__file__).resolve().parents[1]


def cost(topic: str, payload: bytes) -> int:
    return len(topic.encode()) + len(payload) + ROW_OVERHEAD


def test_messages_survive_a_kill_9_of_the_writing_process(tmp_path: Path) -> None:
    db = tmp_path / "state" / "outbox.db"
    script = textwrap.dedent(f"""
        import os, signal
        from agent.messaging.outbox import Outbox
        ob = Outbox({str(db)!r})
        for i in range(200):
            ob.put("cam/1/detections", b"msg-%d" % i)
        ob.ack_many([1, 2, 3])
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: as hard as a crash gets
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert Path(f"{db}-wal").exists()  # the data really was only in the WAL when it died

    ob = Outbox(db)
    msgs = ob.peek(limit=1000)
    assert [m.payload for m in msgs] == [b"msg-%d" % i for i in range(3, 200)]
    assert [m.id for m in msgs] == list(range(4, 201))
    assert ob.depth() == 197
    assert ob.size_bytes() == sum(cost(m.topic, m.payload) for m in msgs)
    assert ob.put("t", b"after") == 201  # ids are never reused after a restart
    ob.close()


def test_acked_messages_are_removed_and_order_is_kept(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    ids = [ob.put(f"t/{i}", bytes([i]) * 10, qos=1 + i % 2, retain=i == 3) for i in range(10)]
    assert ids == sorted(ids) and len(set(ids)) == 10
    first = ob.peek(limit=4)
    assert [m.id for m in first] == ids[:4]
    assert first[3].retain is True and first[0].retain is False
    assert (first[0].qos, first[1].qos) == (1, 2)
    assert [m.id for m in ob.peek(limit=3, after_id=ids[4])] == ids[5:8]

    ob.ack(ids[0])
    ob.ack_many([ids[2], ids[5], ids[5], 999_999])  # duplicates and unknown ids are harmless
    ob.ack(ids[0])
    remaining = [m.id for m in ob.peek()]
    assert remaining == [i for i in ids if i not in (ids[0], ids[2], ids[5])]
    assert ob.depth() == 7
    assert ob.size_bytes() == 7 * cost("t/0", b"x" * 10)
    ob.ack_many([])
    ob.close()

    ob = Outbox(tmp_path / "outbox.db")  # acks are durable too
    assert [m.id for m in ob.peek()] == remaining
    assert ob.peek()[0].payload == bytes([1]) * 10
    ob.close()


def test_size_bound_drops_oldest_and_counts_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "outbox.db"
    ob = Outbox(db, max_mb=0.01)  # 10485 bytes: ~9 messages of 1 KB
    each = cost("t", b"x" * 1000)
    with caplog.at_level(logging.WARNING, logger="agent.messaging.outbox"):
        ids = [ob.put("t", i.to_bytes(2, "big") + b"x" * 998) for i in range(100)]
    assert ob.size_bytes() <= ob.max_bytes
    assert ob.size_bytes() == ob.depth() * each
    assert ob.dropped == 100 - ob.depth() > 80
    kept = ob.peek()
    assert [m.id for m in kept] == ids[-len(kept):]  # the newest survive, oldest went first, in order
    assert int.from_bytes(kept[-1].payload[:2], "big") == 99
    assert "dropped" in caplog.text
    # Dropping is batched down to ~90%, not one row per put once full.
    drops = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) < ob.dropped
    total = ob.dropped
    ob.close()

    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='dropped_total'").fetchone()[0] == total
    ob = Outbox(db, max_mb=0.01)
    assert ob.dropped == 0  # per-open counter; the running total lives in meta
    for _ in range(20):
        ob.put("t", b"y" * 1000)
    ob.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='dropped_total'").fetchone()[0] > total


def test_empty_payloads_are_bounded_too(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db", max_mb=0.001)
    for _ in range(500):
        ob.put("x", b"")
    assert ob.depth() * cost("x", b"") <= ob.max_bytes and ob.dropped > 0
    ob.close()


def _assert_stays_usable(ob: Outbox, stored: list[int], make_room) -> None:
    assert [m.id for m in ob.peek(limit=10_000)] == stored  # nothing half-written
    assert ob.depth() == len(stored)
    assert ob.size_bytes() == sum(cost(m.topic, m.payload) for m in ob.peek(limit=10_000))
    make_room()
    new = ob.put("t", b"after the disk filled")
    assert new > stored[-1]
    ob.ack_many(stored[:5])
    assert ob.depth() == len(stored) - 4
    with sqlite3.connect(ob.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _fill(ob: Outbox, payload: bytes) -> tuple[list[int], OutboxError]:
    stored: list[int] = []
    for _ in range(10_000):
        try:
            stored.append(ob.put("cam/1/detections", payload))
        except OutboxError as exc:
            return stored, exc
    raise AssertionError("the disk never filled")


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_on_a_small_disk_the_outbox_keeps_a_reserve_free_and_recovers_from_a_full_one(tmp_path: Path) -> None:
    # A REAL filesystem: a 1 MB tmpfs (root mounts it; the test set-up runs as root).
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"this test mounts a 1 MB tmpfs for a real full disk (needs root): {res.stderr.strip()}")
    try:
        ob = Outbox(mnt / "state" / "outbox.db", max_mb=50)
        ids = [ob.put("cam/1/detections", os.urandom(4000)) for _ in range(400)]  # 1.6 MB on a 1 MB disk
        # It never filled the disk: past its reserve it reuses its oldest messages' pages, and counts them.
        assert _free(mnt) >= 64 * 1024, f"{_free(mnt)} bytes left free"
        kept = [m.id for m in ob.peek(limit=10_000)]
        assert ob.dropped > 0 and kept == ids[-len(kept):] and len(kept) + ob.dropped == 400
        # Something else fills the disk to the last byte: a clear error, nothing half-written.
        ballast = mnt / "ballast"
        fd = os.open(ballast, os.O_CREAT | os.O_WRONLY)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        stored, exc = _fill(ob, os.urandom(4000))
        assert "outbox" in str(exc) and str(ob.path) in str(exc)
        assert "No space left on device" in str(exc) or "the disk is nearly full" in str(exc)
        # Acknowledged while full: never offered again, deleted once there is room.
        first = kept[:5]
        with contextlib.suppress(OutboxError):
            ob.ack_many(first)
        assert not {m.id for m in ob.peek(limit=10_000)} & set(first)
        depth = ob.depth()
        ballast.unlink()
        ob.delete_acked()
        assert ob.depth() == depth and ob._acked == set()
        new = ob.put("cam/1/detections", b"after the disk filled")  # usable again
        waiting = ob.peek(limit=10_000)
        assert waiting[-1].id == new and ob.depth() == len(waiting)
        assert ob.size_bytes() == sum(cost(m.topic, m.payload) for m in waiting)
        with sqlite3.connect(ob.path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ob.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_simulated_full_database_gives_the_same_error(tmp_path: Path) -> None:
    # Without mount rights: PRAGMA max_page_count caps the database, and sqlite then fails with
    # the very same SQLITE_FULL ("database or disk is full") that a full filesystem produces.
    ob = Outbox(tmp_path / "outbox.db", max_mb=50)
    ob.put("t", b"warm-up")
    conn = ob._conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages + 40}")
    stored, exc = _fill(ob, os.urandom(3000))
    stored.insert(0, 1)
    assert "database or disk is full" in str(exc) and str(ob.path) in str(exc)
    assert "SQLITE_FULL" in str(exc)
    _assert_stays_usable(ob, stored, lambda: conn.execute("PRAGMA max_page_count=1073741823"))
    ob.close()


def test_corrupt_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "outbox.db"
    junk = b"this is not a sqlite database\n" * 200
    db.write_bytes(junk)
    Path(f"{db}-wal").write_bytes(b"stale wal")
    with caplog.at_level(logging.WARNING, logger="agent.messaging.outbox"):
        ob = Outbox(db)
    assert ob.depth() == 0 and ob.put("t", b"fresh") == 1
    # sqlite itself deletes the unusable stale WAL when the failed connection closes; what
    # matters is that the junk is kept for inspection and nothing stale is replayed.
    aside = sorted(tmp_path.glob("outbox.db.corrupt-*"))
    assert aside[0].read_bytes() == junk
    assert "moved it to" in caplog.text and str(aside[0]) in caplog.text
    ob.close()
    db.write_bytes(junk)  # a second corruption in the same second gets its own name
    Outbox(db).close()
    assert len([p for p in tmp_path.glob("outbox.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]) == 2


def test_two_putters_and_one_acker_end_consistent(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    put_ids: list[list[int]] = [[], []]
    acked: list[int] = []
    done = threading.Event()

    def putter(n: int) -> None:
        for i in range(400):
            put_ids[n].append(ob.put(f"t/{n}", b"%d-%d" % (n, i)))

    def acker() -> None:
        last = 0
        while True:
            batch = ob.peek(limit=50, after_id=last)
            if not batch:
                if done.is_set() and ob.depth() == 0:
                    return
                time.sleep(0.001)  # don't spin on the GIL while the putters catch up
                continue
            assert [m.id for m in batch] == sorted(m.id for m in batch)
            last = batch[-1].id
            ob.ack_many(m.id for m in batch)
            acked.extend(m.id for m in batch)

    threads = [threading.Thread(target=putter, args=(n,)) for n in (0, 1)]
    ack_thread = threading.Thread(target=acker)
    for t in [*threads, ack_thread]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    ack_thread.join(timeout=10)
    assert not ack_thread.is_alive()
    assert all(ids == sorted(ids) for ids in put_ids)
    assert sorted(acked) == sorted(put_ids[0] + put_ids[1]) and len(set(acked)) == 800
    assert ob.depth() == 0 and ob.size_bytes() == 0
    ob.close()


def test_permissions_and_validation(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b" / "outbox.db"
    ob = Outbox(db, synchronous="full")
    assert stat.S_IMODE(db.stat().st_mode) == 0o640
    assert stat.S_IMODE(db.parent.stat().st_mode) == stat.S_IMODE(db.parent.parent.stat().st_mode) == 0o750
    with pytest.raises(ValueError):
        ob.put("t", b"x", qos=3)
    with pytest.raises(ValueError):
        ob.put("t", b"x" * (ob.max_bytes + 1))
    with pytest.raises(ValueError):
        Outbox(tmp_path / "x.db", synchronous="sometimes")
    ob.close()
    ob.close()
    with pytest.raises(OutboxError, match="closed"):
        ob.put("t", b"x")


def test_a_full_outbox_drops_predictions_before_control_messages(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db", max_mb=1)
    event = ob.put("edge/cam/deploy/status", b'{"state": "downloading"}', lane=CONTROL)
    for _ in range(300):  # 300 x 4 KB: well over 1 MB
        ob.put("edge/cam/predictions", os.urandom(4000))
    kept = ob.peek(limit=10_000)
    assert kept[0].id == event and ob.dropped > 0  # the oldest message, and still there
    assert ob.size_bytes() <= ob.max_bytes


def test_acknowledged_rows_removed_to_make_room_are_not_counted_as_dropped(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db", max_mb=1)
    first = [ob.put("edge/cam/predictions", os.urandom(4000)) for _ in range(100)]
    for i in first[:50]:
        ob.acked(i)  # the broker has these; their delete is due on the sender's next turn
    for _ in range(200):  # over 1 MB: the oldest rows make room, and half of those were delivered
        ob.put("edge/cam/predictions", os.urandom(4000))
    waiting = ob.peek(limit=10_000)
    # every message put is delivered, waiting, or counted as dropped; none twice
    assert ob.dropped + len(waiting) == 300 - 50
    ob.delete_acked()
    assert ob.depth() == len(waiting)
