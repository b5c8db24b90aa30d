"""Durable coordinator state: the replicated op journal in SQLite (WAL), compacted into snapshots.

The coordinator already expresses every change of its replicated state as a sequenced op (the
``StateUpdate`` stream the standby applies). This module keeps the same stream on disk:

* ``journal(id, lineage, seq, term, op, data)``: one row per commit, ``data`` msgpack. The primary
  appends each op it emits, a standby each op it applies; a commit of one op writes it as its row,
  a commit of several writes one ``ops`` row (seq and term of its last op) whose data is the list
  of ``[seq, term, op, data]``, each op's data packed on its own (a corrupt op costs that op). A
  row per op cost the coordinator's loop about 15 us per op in SQLite (issue #14).
* ``snapshot_rows(gen, item, part, data)``: a snapshot as a sequence of items (one job, the task
  list, the members, ...), each packed on its own and split into parts of at most ``chunk_bytes``,
  so neither writing nor reading a large state needs one giant blob in memory, and a corrupt item
  costs that item, not the snapshot.
* ``snapshots(gen, lineage, seq, term, complete)``: which snapshot is usable (``complete``).

A *lineage* is one continuous history of seqs. Compaction keeps the lineage (the snapshot at seq S
replaces journal rows <= S); installing a snapshot received from the primary starts a new lineage,
because this node's own journal may hold ops of another history with the same seq numbers (a
demoted primary). Restore = the newest complete snapshot + the journal rows of its lineage after
its seq, in seq order.

Durability: ``append`` queues an op; ``commit`` writes the queued ops in one transaction (the
coordinator's loop commits every ``state_commit_interval``, and before answering any client command). With
``journal_mode=WAL`` and ``synchronous=NORMAL`` a commit is a write() into the WAL file, not an
fsync: a committed op survives the death of the process (SIGKILL, OOM kill) but the last commits
before a power failure or kernel crash may be lost (the WAL is fsync'd at checkpoints, which run on
the compaction thread, never on the loop). SQLite's WAL frame checksums drop a torn tail.

Compaction runs on its own thread with its own connection, in short transactions (one per part),
so the loop's commits wait at most one part's write for the write lock.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

log = logging.getLogger("idunno.coordinator.store")

FORMAT = 2  # 2: ``ops`` rows (several ops per commit); a format-1 file is read as it is and upgraded
READS = (1, 2)
BATCH = "ops"  # the op name of a row holding several ops (never an op of the coordinator's state)
BUSY_TIMEOUT = 30.0  # seconds a connection waits for the write lock (the other side holds it for ms)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT, lineage INTEGER NOT NULL, seq INTEGER NOT NULL,
    term INTEGER NOT NULL, op TEXT NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS journal_lineage_seq ON journal (lineage, seq);
CREATE TABLE IF NOT EXISTS snapshots (
    gen INTEGER PRIMARY KEY, lineage INTEGER NOT NULL, seq INTEGER NOT NULL, term INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS snapshot_rows (
    gen INTEGER NOT NULL, item INTEGER NOT NULL, part INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (gen, item, part));
"""


class StateStoreError(Exception):
    """The store cannot be opened or used at all (not a database, wrong format)."""


@dataclass
class Loaded:
    """What :meth:`StateStore.load` found: a snapshot's items and the journal ops after it."""

    seq: int = 0  # the snapshot's seq (0: no snapshot)
    term: int = 0  # highest term in the snapshot and the journal
    last_seq: int = 0  # highest seq ever committed in this lineage (ops not journaled still count)
    items: list[tuple[str, Any]] = field(default_factory=list)
    skipped: int = 0  # rows or items that could not be decoded (logged)


@dataclass
class CompactionStats:
    count: int = 0
    last_seconds: float = 0.0  # wall time of the last compaction on its thread
    last_bytes: int = 0
    last_seq: int = 0


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    # Checkpoints (the only fsyncs) are run by the compaction thread, never by a loop commit.
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("PRAGMA journal_size_limit=67108864")  # a WAL grown by a big snapshot shrinks back to 64 MiB
    return db


def row_ops(path: Path, row: tuple[Any, ...], out: Loaded) -> Iterator[tuple[int, int, str, dict[str, Any]]]:
    """The ops of one journal row ``(seq, term, op, data)``: itself, or the ops of an ``ops`` row;
    corrupt ones skipped with a warning and counted in ``out.skipped``."""
    seq, term, op, data = row
    if op != BATCH:
        yield from _decoded(path, seq, term, op, data, out)
        return
    try:
        entries = _unpack(data)
        if not isinstance(entries, list):
            raise ValueError("not a list of ops")
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        out.skipped += 1
        log.warning("coordinator state %s: journal row of ops up to seq %s is corrupt (%s); skipped", path, seq, exc)
        return
    for entry in entries:
        if isinstance(entry, list) and len(entry) == 4:
            yield from _decoded(path, *entry, out)
        else:
            out.skipped += 1
            log.warning("coordinator state %s: an op in the row up to seq %s is corrupt; skipped", path, seq)


def _decoded(path: Path, seq: Any, term: Any, op: Any, data: Any,
             out: Loaded) -> Iterator[tuple[int, int, str, dict[str, Any]]]:
    try:
        value = _unpack(data)
        if not isinstance(value, dict) or not isinstance(op, str) or op == BATCH:
            raise ValueError("not an op")
        seq, term = int(seq), int(term)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        out.skipped += 1
        log.warning("coordinator state %s: journal op seq %s is corrupt (%s); skipped", path, seq, exc)
        return
    yield seq, term, op, value


class StateStore:
    def __init__(self, path: str | Path, chunk_bytes: int = 1 << 20, compact_ops: int = 20_000,
                 checkpoint_interval: float = 5.0) -> None:
        self.path = Path(path)
        self.chunk_bytes = max(1024, chunk_bytes)
        self.compact_ops = max(1, compact_ops)
        self.checkpoint_interval = checkpoint_interval
        try:
            self.db = _connect(self.path)
            self.db.executescript(SCHEMA)
            fmt = self._meta(self.db, "format")
            if fmt not in READS and fmt is not None:
                raise StateStoreError(f"{self.path}: state format {fmt}, this version reads "
                                      f"{', '.join(map(str, READS))}")
            if fmt != FORMAT:  # new, or a format-1 file: its rows stay readable, new ones may batch
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (FORMAT,))
        except sqlite3.DatabaseError as exc:
            raise StateStoreError(
                f"cannot open the coordinator state {self.path}: {exc}. Move it aside to start this "
                f"coordinator without its jobs (a running peer coordinator still has them)") from exc
        self.lineage = 0
        self.in_tx = False
        self.rows: list[tuple[int, int, int, str, bytes]] = []  # ops appended, written at the next commit
        self.since_snapshot = 0  # journal ops after the newest snapshot (compaction trigger)
        self.requested = 0  # compactions handed to the thread
        self.finished = 0  # ... and reported back by poll()
        self.stats = CompactionStats()
        self.failed = False  # an append or commit failed: the next compaction rewrites everything
        self._done: queue.Queue[tuple[int, float, int, int]] = queue.Queue()  # finished compactions
        self._work: queue.Queue[tuple | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="state-compactor", daemon=True)
        self._thread.start()

    @staticmethod
    def _meta(db: sqlite3.Connection, key: str) -> int | None:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    # -- start-up ---------------------------------------------------------------------------------
    def load(self) -> Loaded:
        """The newest complete snapshot and the ops after it; sets the lineage new appends use.

        Undecodable rows are skipped with a warning (the ops are idempotent and tolerant of
        missing predecessors, as they are on a standby), never a crash.
        """
        out = Loaded()
        row = self.db.execute(
            "SELECT gen, lineage, seq, term FROM snapshots WHERE complete = 1 ORDER BY gen DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            gen, self.lineage, out.seq, out.term = row
            out.items = list(self._read_snapshot(gen, out))
        else:
            # No snapshot yet: lineage 0, the history that started from nothing, is the whole
            # state. Any other lineage is an install whose snapshot never reached the disk: its
            # ops without that snapshot would be patches onto nothing.
            self.lineage = 0
        # Rows of other lineages: an install whose snapshot never completed, or history already
        # superseded by this snapshot. Both are unusable with it.
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM journal WHERE lineage != ?", (self.lineage,))
            self.db.execute("DELETE FROM snapshot_rows WHERE gen NOT IN (SELECT gen FROM snapshots WHERE complete = 1)")
            self.db.execute("DELETE FROM snapshots WHERE complete = 0")
        out.last_seq = max(out.seq, self._meta(self.db, f"seq.{self.lineage}") or 0)
        return out

    def _read_snapshot(self, gen: int, out: Loaded) -> Iterator[tuple[str, Any]]:
        parts: list[bytes] = []
        item = None
        cur = self.db.execute("SELECT item, part, data FROM snapshot_rows WHERE gen = ? ORDER BY item, part", (gen,))
        for it, part, data in cur:
            if it != item:
                if parts:
                    yield from self._decode_item(item, parts, out)
                item, parts = it, []
            if part != len(parts) or not isinstance(data, bytes):
                data = b"\xc1"  # a missing or mistyped part: the item cannot be decoded (0xc1 is never msgpack)
            parts.append(data)
        if parts:
            yield from self._decode_item(item, parts, out)

    def _decode_item(self, item: Any, parts: list[bytes], out: Loaded) -> Iterator[tuple[str, Any]]:
        try:
            kind, value = _unpack(b"".join(parts))
            yield str(kind), value
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            out.skipped += 1
            log.warning("coordinator state %s: snapshot item %s is corrupt (%s); skipped", self.path, item, exc)

    def journal_ops(self, after: int, out: Loaded) -> Iterator[tuple[int, int, str, dict[str, Any]]]:
        """The journal of the current lineage after seq ``after``, in order, streamed from disk."""
        cur = self.db.execute(
            "SELECT seq, term, op, data FROM journal WHERE lineage = ? AND seq > ? ORDER BY seq",
            (self.lineage, after))
        n = 0
        for row in cur:
            for seq, term, op, value in row_ops(self.path, row, out):
                if seq <= after:
                    continue  # (a batch never straddles a snapshot: compact() commits first)
                n += 1
                out.term = max(out.term, term)
                out.last_seq = max(out.last_seq, seq)
                yield seq, term, op, value
        self.since_snapshot = n

    # -- the loop's side --------------------------------------------------------------------------
    def append(self, seq: int, term: int, op: str, data: dict[str, Any]) -> None:
        """Queue one op for the next :meth:`commit`, which writes the queued ops as one row (an
        INSERT per op cost the coordinator's loop ~30 us per query, issue #14)."""
        try:
            self.rows.append((self.lineage, seq, term, op, _pack(data)))
        except (TypeError, ValueError) as exc:
            self._failed(f"appending op {seq} ({op})", exc)

    def commit(self, seq: int) -> None:
        """Write the queued ops in one transaction (the loop's group commit; before answering a client)."""
        if not self.rows:
            return
        rows, self.rows = self.rows, []
        ops = len(rows)
        try:
            if ops > 1:  # one row for the commit's ops (see the module docstring)
                last = rows[-1]
                rows = [(last[0], last[1], last[2], BATCH, _pack([list(r[1:]) for r in rows]))]
            self.db.execute("BEGIN")
            self.in_tx = True
            self.db.executemany("INSERT INTO journal (lineage, seq, term, op, data) VALUES (?, ?, ?, ?, ?)", rows)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"seq.{self.lineage}", seq))
            self.db.execute("COMMIT")
            self.since_snapshot += ops
        except sqlite3.Error as exc:
            self._failed(f"committing up to op {seq}", exc)
        finally:
            self.in_tx = False

    def _failed(self, what: str, exc: Exception) -> None:
        log.error("coordinator state %s: %s failed: %s (the next compaction rewrites the whole state)",
                  self.path, what, exc)
        self.failed = True
        if self.in_tx:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self.in_tx = False

    def new_lineage(self, seq: int) -> None:
        """A snapshot from the primary replaces this node's history: ops from now on start a new
        lineage, usable once the snapshot of ``seq`` (requested next with :meth:`compact`) is complete."""
        self.commit(seq)
        row = self.db.execute("SELECT MAX(lineage) FROM journal").fetchone()[0]
        snap = self.db.execute("SELECT MAX(lineage) FROM snapshots").fetchone()[0]
        self.lineage = max(self.lineage, int(row or 0), int(snap or 0)) + 1

    @property
    def compacting(self) -> bool:
        return self.finished < self.requested

    def should_compact(self) -> bool:
        return not self.compacting and (self.failed or self.since_snapshot >= self.compact_ops)

    def compact(self, seq: int, term: int, items: list[tuple[str, Any]]) -> None:
        """Write ``items`` (the state at ``seq``) as a snapshot on the compaction thread.

        ``items`` must not be mutated afterwards by the caller (the coordinator builds them fresh).
        """
        self.commit(seq)
        self.requested += 1
        self.failed = False
        self.since_snapshot = 0
        self._work.put(("compact", self.lineage, seq, term, items))

    def poll(self) -> list[tuple[int, float, int, int]]:
        """Compactions finished since the last call: (seq, seconds, bytes, lineage)."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        self.finished += len(out)
        for seq, _, _, _ in out:
            if seq < 0:
                self.failed = True  # try again at the next opportunity with the state as it is then
        return out

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every requested compaction has finished (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.compacting and time.monotonic() < deadline:
            try:
                item = self._done.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self._done.put(item)
            self.poll()
        return not self.compacting

    def close(self) -> None:
        """Stop the compaction thread (a compaction in progress finishes first) and close."""
        if self.rows:
            self.commit(self.rows[-1][1])
        self._work.put(None)
        self._thread.join(timeout=30)
        self.db.close()

    def info(self) -> dict[str, Any]:
        """For ``info``: how much journal awaits compaction and what the last compaction cost."""
        st = self.stats
        return {"path": str(self.path), "lineage": self.lineage, "journal_ops": self.since_snapshot,
                "compact_ops": self.compact_ops, "compactions": st.count, "compacting": self.compacting,
                "last_compaction": {"seq": st.last_seq, "seconds": round(st.last_seconds, 3), "bytes": st.last_bytes}}

    # -- the compaction thread --------------------------------------------------------------------
    def _run(self) -> None:
        db = _connect(self.path)
        next_checkpoint = time.monotonic() + self.checkpoint_interval
        try:
            while True:
                try:
                    work = self._work.get(timeout=max(0.05, next_checkpoint - time.monotonic()))
                except queue.Empty:
                    work = ()
                if work is None:
                    break
                if work:
                    try:
                        self._compact(db, *work[1:])
                    except Exception:
                        log.exception("coordinator state %s: compaction failed", self.path)
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                        self._done.put((-1, 0.0, 0, work[1]))
                if time.monotonic() >= next_checkpoint:
                    next_checkpoint = time.monotonic() + self.checkpoint_interval
                    try:
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the fsync, off the loop
                    except sqlite3.Error as exc:
                        log.warning("coordinator state checkpoint failed: %s", exc)
        finally:
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass
            db.close()

    def _compact(self, db: sqlite3.Connection, lineage: int, seq: int, term: int,
                 items: list[tuple[str, Any]]) -> None:
        t0 = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        gen = int(db.execute("SELECT COALESCE(MAX(gen), 0) + 1 FROM snapshots").fetchone()[0])
        db.execute("INSERT INTO snapshots (gen, lineage, seq, term, complete, created) VALUES (?, ?, ?, ?, 0, ?)",
                   (gen, lineage, seq, term, time.time()))
        db.execute("COMMIT")
        written = 0
        for n, item in enumerate(items):
            blob = _pack(list(item))
            items[n] = ("", None)  # let the item go as soon as it is on disk (memory ceiling)
            # One short transaction per part: the loop's commits never wait long for the lock.
            for part in range(0, max(1, len(blob)), self.chunk_bytes):
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO snapshot_rows (gen, item, part, data) VALUES (?, ?, ?, ?)",
                           (gen, n, part // self.chunk_bytes, blob[part:part + self.chunk_bytes]))
                db.execute("COMMIT")
            written += len(blob)
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE snapshots SET complete = 1 WHERE gen = ?", (gen,))
        db.execute("COMMIT")
        # Superseded: older snapshots, and the journal this snapshot contains (in batches, so the
        # write lock is held briefly).
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM snapshot_rows WHERE gen < ?", (gen,))
        db.execute("DELETE FROM snapshots WHERE gen < ?", (gen,))
        db.execute("COMMIT")
        while True:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                "DELETE FROM journal WHERE id IN (SELECT id FROM journal WHERE lineage < ? OR "
                "(lineage = ? AND seq <= ?) LIMIT 5000)", (lineage, lineage, seq))
            db.execute("COMMIT")
            if cur.rowcount < 5000:
                break
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        dt = time.perf_counter() - t0
        self.stats = CompactionStats(self.stats.count + 1, dt, written, seq)
        log.info("coordinator state compacted at seq %d: %d items, %.1f MB in %.2fs",
                 seq, len(items), written / 1e6, dt)
        self._done.put((seq, dt, written, lineage))
