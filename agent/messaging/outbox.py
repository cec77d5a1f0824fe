"""Durable store-and-forward queue for QoS >= 1 MQTT messages (sqlite3, WAL mode).

Messages stay on disk until the broker acks them, survive kill -9, and are size-bounded (oldest dropped).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Approximate per-row cost (id, qos, retain, created, record header, cell pointer). Counting it
# means a flood of empty payloads (e.g. retained-message clears) is still bounded.
ROW_OVERHEAD = 32
_COST_SQL = f"length(CAST(topic AS BLOB)) + length(payload) + {ROW_OVERHEAD}"
_SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# Primary sqlite result codes -> the OS condition behind them, for a message a user can act on.
_ERRNO_HINTS = {13: errno.ENOSPC, 8: errno.EROFS, 10: errno.EIO, 14: errno.EACCES}
_CORRUPT_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
# Disk: the outbox never takes its filesystem below RESERVE_BYTES free (an eighth of a small one):
# past that it reuses the pages of its oldest messages (dropped, counted) instead of growing, so the
# WAL and the deletes of acknowledged rows always find room. The WAL is checkpointed (and cut back)
# at half the reserve: 4 MiB as sqlite does by default, less on a small filesystem.
RESERVE_BYTES = 8 * 2**20
PAGE = 4096

# AUTOINCREMENT: ids are never reused, even once the table was empty, so they stay a send order.
# lane: CONTROL (deployment events, health: few, and someone waits for them) goes out before DATA
# (predictions, which an outage piles up by the thousand), and DATA is dropped first when full.
_SCHEMA = """CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
    payload BLOB NOT NULL, qos INT NOT NULL, retain INT NOT NULL, created REAL NOT NULL, lane INT NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"""
CONTROL, DATA = 0, 1


@dataclass(frozen=True)
class OutboxMessage:
    """One queued message; ``id`` increases monotonically and is the send order."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float


class OutboxError(RuntimeError):
    """The outbox could not be read or written (disk full, read-only, I/O error, closed)."""


def _describe(path: Path, action: str, exc: sqlite3.Error) -> OutboxError:
    name = getattr(exc, "sqlite_errorname", "sqlite error")
    os_errno = _ERRNO_HINTS.get(getattr(exc, "sqlite_errorcode", 0) & 0xFF)
    hint = f": {os.strerror(os_errno)}" if os_errno is not None else ""
    return OutboxError(f"outbox {path}: {action} failed ({exc} [{name}]{hint})")


def _make_dirs(directory: Path) -> None:
    """Create missing directories with mode 0o750 (os.makedirs only applies ``mode`` to the leaf)."""
    if not directory.exists():
        _make_dirs(directory.parent)
        directory.mkdir(mode=0o750, exist_ok=True)
        os.chmod(directory, 0o750)  # exact mode regardless of the umask


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o640))
    os.chmod(path, 0o640)  # sqlite gives the -wal/-shm files the same mode as the database


class Outbox:
    """Thread-safe durable FIFO of MQTT messages; one sqlite connection behind one lock."""

    def __init__(self, path: str | Path, max_mb: float = 50.0, synchronous: str = "NORMAL") -> None:
        # WAL + synchronous=NORMAL: a commit is in the WAL file (OS page cache) before put()
        # returns, so a process crash or kill -9 loses nothing. Power loss may lose the last
        # transactions (not yet fsynced) but never corrupts the database. Messages are telemetry
        # and an fsync per message would cost SD-card wear and latency at 15-30 msg/s, so that
        # is the accepted trade-off; pass synchronous="FULL" to fsync every commit.
        if synchronous.upper() not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {_SYNC_MODES}, got {synchronous!r}")
        if max_mb <= 0:
            raise ValueError(f"max_mb must be > 0, got {max_mb}")
        self.path = Path(path)
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._sync = synchronous.upper()
        self._lock = threading.Lock()
        self._dropped = 0
        self._acked: set[int] = set()  # acknowledged, not yet deleted (next turn, or once a full disk has room)
        self._room_left, self._room_at = 0, 0.0  # the disk's room, as last looked up (see _room)
        _make_dirs(self.path.parent)
        if not self.path.exists():
            _create_file(self.path)
        for attempt in range(2):
            try:
                conn = self._open()
                break
            except sqlite3.DatabaseError as exc:
                corrupt = getattr(exc, "sqlite_errorcode", 0) & 0xFF in _CORRUPT_CODES or "quick_check" in str(exc)
                if attempt or not corrupt:  # locked, unreadable, read-only dir: not ours to "fix"
                    raise _describe(self.path, "open", exc) from exc
                self._move_aside(exc)
        self._conn: sqlite3.Connection | None = conn
        self._bytes = conn.execute(f"SELECT COALESCE(SUM({_COST_SQL}), 0) FROM messages").fetchone()[0]

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so each put is one transaction.
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._sync}")
            wal = max(self._disk()[1] // 2, 16 * PAGE)
            conn.execute(f"PRAGMA journal_size_limit={wal}")  # truncate a grown WAL after checkpoints
            conn.execute(f"PRAGMA wal_autocheckpoint={wal // PAGE}")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":  # readable header but damaged pages: would fail later, mid-run
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            conn.executescript(_SCHEMA)
            if "lane" not in {row[1] for row in conn.execute("PRAGMA table_info(messages)")}:  # an older outbox
                conn.execute("ALTER TABLE messages ADD COLUMN lane INT NOT NULL DEFAULT 1")
            # Control messages are few: a partial index finds them without costing each prediction's insert.
            conn.execute("CREATE INDEX IF NOT EXISTS control_messages ON messages (id) WHERE lane = 0")
        except BaseException:
            conn.close()
            raise
        return conn

    def _move_aside(self, exc: Exception) -> None:
        """Rename a corrupt file (and its -wal/-shm) so the device starts fresh instead of failing."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target, n = self.path.with_name(f"{self.path.name}.corrupt-{stamp}"), 1
        while target.exists():
            target, n = self.path.with_name(f"{self.path.name}.corrupt-{stamp}.{n}"), n + 1
        # A leftover WAL must not be replayed into the fresh file (sqlite usually deletes it already).
        for suffix in ("-wal", "-shm"):
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                side.rename(f"{target}{suffix}")
        self.path.rename(target)
        log.warning("outbox %s is not a valid database (%s); moved it to %s and starting empty", self.path, exc, target)
        _create_file(self.path)

    @contextmanager
    def _tx(self, action: str) -> Iterator[tuple[sqlite3.Connection, list[int]]]:
        """One write transaction under the lock; on error roll back and raise OutboxError.

        The body adds its [bytes, dropped] changes to the yielded list; they are applied only
        after COMMIT and still under the lock, so the in-memory totals always match the disk.
        """
        with self._lock:
            conn, delta = self._require_open(), [0, 0]
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn, delta
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):  # sqlite may have rolled back itself (e.g. on SQLITE_FULL)
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise _describe(self.path, action, exc) from exc
                raise
            self._bytes += delta[0]
            self._dropped += delta[1]

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"outbox {self.path}: closed")
        return self._conn

    def _query(self, sql: str, params: tuple[int, ...] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._require_open().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _describe(self.path, "read", exc) from exc

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, lane: int = DATA) -> int:
        """Store one message and return its id; if over ``max_mb``, drop the oldest first (DATA before CONTROL)."""
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        cost = len(topic.encode()) + len(data) + ROW_OVERHEAD
        if cost > self.max_bytes:  # misconfiguration, not a full queue: it could never fit
            raise ValueError(f"message of {cost} bytes exceeds the whole outbox bound ({self.max_bytes} bytes)")
        why = f"over {self.max_bytes / 2**20:.1f} MB"
        with self._tx("put") as (conn, delta):
            dropped = freed = 0
            if self._bytes + cost > self.max_bytes:  # batch down to 90% so a full outbox isn't 1 delete/put
                dropped, freed = self._drop_oldest(conn, self._bytes + cost - int(self.max_bytes * 0.9))
            elif self._room(conn, cost) < cost * 2:  # its pages would take the last free space
                disk = self._disk(conn)
                why = f"on a disk nearly full (it keeps {disk[1] / 2**20:.1f} MB free)"
                dropped, freed = self._drop_oldest(conn, max(cost, self._bytes // 10))
                if not freed:
                    raise OutboxError(f"outbox {self.path}: the disk is nearly full ({disk[0] / 2**20:.1f} MB to use; "
                                      f"the outbox keeps {disk[1] / 2**20:.1f} MB free for its log and deletes)")
            sql = "INSERT INTO messages (topic, payload, qos, retain, created, lane) VALUES (?, ?, ?, ?, ?, ?)"
            msg_id = conn.execute(sql, (topic, data, qos, int(retain), time.time(), lane)).lastrowid
            delta[:] = [cost - freed, dropped]
        if delta[1]:
            log.warning("outbox %s %s: dropped %d oldest messages", self.path, why, delta[1])
        return int(msg_id or 0)  # always set after an INSERT; `or 0` only narrows the type

    def _room(self, conn: sqlite3.Connection, cost: int) -> int:
        """Bytes the outbox may still take (``_disk``), looked up once a second, or at every put when it
        runs short (a put takes more than its cost: pages, the WAL); meanwhile each put takes its cost
        off the last figure."""
        now = time.monotonic()
        if self._room_left < 64 * cost + 2**20 or now - self._room_at > 1.0:  # near the end: every put
            free, reserve = self._disk(conn)
            self._room_left, self._room_at = free - reserve, now
        self._room_left -= cost
        return self._room_left + cost

    def _disk(self, conn: sqlite3.Connection | None = None) -> tuple[int, int]:
        """(bytes the outbox can still use: free on its filesystem, plus free pages inside the database
        when ``conn`` is given; bytes it must leave free on the filesystem: the reserve)."""
        st = os.statvfs(self.path.parent)
        inside = 0
        if conn is not None:
            inside = conn.execute("PRAGMA freelist_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
        return st.f_bavail * st.f_frsize + inside, min(RESERVE_BYTES, st.f_blocks * st.f_frsize // 8)

    def _drop_oldest(self, conn: sqlite3.Connection, need: int) -> tuple[int, int]:
        """Delete oldest rows in one batch until ``need`` bytes are freed (down to ~90% of the bound).

        Rows already acknowledged go too but are not counted as dropped: the broker has them."""
        count = freed = 0
        doomed: list[int] = []
        cur = conn.execute(f"SELECT id, {_COST_SQL} FROM messages ORDER BY lane DESC, id")
        for msg_id, cost in cur:
            count, freed = count + (msg_id not in self._acked), freed + cost
            doomed.append(msg_id)
            if freed >= need:
                break
        cur.close()
        if doomed:  # (acknowledged ids stay booked: their delete next turn finds nothing, as it should)
            conn.executemany("DELETE FROM messages WHERE id = ?", ((i,) for i in doomed))
            conn.execute("INSERT INTO meta VALUES ('dropped_total', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value", (count,))
        return count, freed

    def peek(self, limit: int = 100, after_id: int = 0, *, lane: int | None = None, exclude: Iterable[int] = (),
             newest: bool = False) -> list[OutboxMessage]:
        """Up to ``limit`` waiting messages with id > ``after_id`` (of one ``lane``, not in ``exclude``),
        oldest first, or the newest ones (still returned oldest first) with ``newest``."""
        with self._lock:
            skip = (*exclude, *self._acked)
        where = "id > ?" + ("" if lane is None else " AND lane = ?") + (f" AND id NOT IN ({','.join('?' * len(skip))})"
                                                                       if skip else "")
        sql = (f"SELECT id, topic, payload, qos, retain, created FROM messages WHERE {where} "
               f"ORDER BY id {'DESC' if newest else ''} LIMIT ?")
        rows = self._query(sql, (after_id, *(() if lane is None else (lane,)), *skip, limit))
        found = [OutboxMessage(i, t, bytes(p), q, bool(r), c) for i, t, p, q, r, c in rows]
        return found[::-1] if newest else found

    def ack(self, msg_id: int) -> None:
        """Remove one message (the broker acknowledged it); unknown ids are ignored."""
        self.ack_many((msg_id,))

    def ack_many(self, ids: Iterable[int]) -> None:
        """Remove several acknowledged messages in one transaction.

        When the delete fails (a disk filled by something else), the ids are kept and never sent
        again; each later ack, and ``delete_acked``, deletes them once the disk has room.
        """
        with self._lock:
            self._acked.update(ids)
            unique = sorted(self._acked)
        if not unique:
            return
        try:
            self._delete(unique)
        except OutboxError:
            with self._lock:  # a checkpoint makes the WAL start over in the space it has: the next try may fit
                with suppress(sqlite3.Error):
                    self._require_open().execute("PRAGMA wal_checkpoint(RESTART)")
            raise
        with self._lock:
            self._acked.difference_update(unique)

    def acked(self, msg_id: int) -> None:
        """Book one message as acknowledged: never offered again; ``delete_acked`` removes it."""
        with self._lock:
            self._acked.add(msg_id)

    def delete_acked(self) -> None:
        """Delete what was booked as acknowledged, and what a full disk refused to delete (no-op when none)."""
        if self._acked:
            self.ack_many(())

    def _delete(self, unique: list[int]) -> None:
        with self._tx("ack") as (conn, delta):
            for i in range(0, len(unique), 500):  # stay below sqlite's bound-parameter limit
                chunk = unique[i : i + 500]
                sql = f"SELECT COALESCE(SUM({_COST_SQL}), 0) FROM messages WHERE id IN ({','.join('?' * len(chunk))})"
                delta[0] -= conn.execute(sql, chunk).fetchone()[0]
            conn.executemany("DELETE FROM messages WHERE id = ?", ((i,) for i in unique))

    def depth(self) -> int:
        """Number of messages waiting (not counting acknowledged ones whose delete is still due)."""
        with self._lock:
            acked = tuple(self._acked)
        return self._query(f"SELECT COUNT(*) FROM messages WHERE id NOT IN ({','.join('?' * len(acked))})", acked)[0][0]

    def size_bytes(self) -> int:
        """Approximate bytes waiting: payload + topic + a small fixed per-row overhead (O(1))."""
        with self._lock:
            return self._bytes

    @property
    def dropped(self) -> int:
        """Messages dropped for size since this Outbox was opened (running total in meta.dropped_total)."""
        with self._lock:
            return self._dropped

    def close(self) -> None:
        """Close the database (idempotent); sqlite checkpoints and removes the WAL on a clean close."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
