"""Chunked, flow-controlled, resumable transfer of the coordinator's state to the standby.

zguide Clone (snapshot at state seq S, then the sequenced updates after S) with the credit-based
transfer of the zguide "fileio" examples: the standby asks for chunks by index and keeps at most
``transfer_window`` requests outstanding; a chunk that does not come is asked for again from the
first one missing (resume); a new ``StateRequest`` supersedes the standby's earlier transfer.

The stream is a sequence of msgpack records, cut into chunks of ``chunk_bytes`` at byte offsets:

  ["head", {seq, term, jobs: n, files: n, <every part of ReplicatedState.head()>}]
  ["job", <job snapshot without its results>]          one per job
  ["results", job_id, {"<index>": result, ...}]       a job's results, in completion order, in slices
  ["sdfs", {name: [next_version, [[version, size, checksum, mtime, holders], ...], tomb], ...}]   in slices
  ["end", {jobs: n, files: n}]

Memory and the primary's loop: on the loop, the primary freezes only what is not idempotent at S
(members, tasks, events, costs, shallow copies of the jobs) and the list of SDFS names. A producer
thread encodes the stream, reading SDFS entries from the live master when their slice is encoded.
That is a *fuzzy* snapshot for SDFS, and it is correct because every SDFS update is an idempotent
whole-entry record: the standby applies every update after S once the snapshot is installed, so each
name ends at its latest entry. The thread stays a few chunks ahead of what the standby acknowledged
(``have``); acknowledged chunks are freed, so the primary never holds the encoded state whole.
The standby decodes each chunk as it arrives (in order), hands SDFS slices to a sink (its master)
at once, stages the rest, and :func:`install` finishes with one :meth:`Coordinator.restore` of the
small remainder: it holds the decoded state once, and no single step of the install is long.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

log = logging.getLogger("idunno.coordinator.snapshot")

RESULTS_SLICE = 5_000  # results per record: a job of any size never becomes one huge record
SDFS_SLICE = 2_000  # SDFS entries per record (about 0.5 MB encoded): one slice is ~10 ms of loop time
MAX_TRANSFERS = 4  # concurrent transfers a primary serves (one per standby; stale ones are dropped)


class SnapshotError(ValueError):
    """A state stream that cannot be installed (bad record, wrong order, counts that do not add up)."""


def _pack(record: list[Any]) -> bytes:
    return msgpack.packb(record, use_bin_type=True)


def sdfs_row(master: Any, name: str) -> list[Any]:
    """One SDFS entry in compact form ``[next_version, [[version, size, checksum, mtime, holders], ...]]``,
    read from the live master by the producer thread: each step is one C-level operation (dict get,
    list of a dict's values, sorted of a set) that the loop thread cannot interleave with, and a
    VersionMeta's fields other than ``holders`` never change, so the row is some state at or after S."""
    versions = list((master.files.get(name) or {}).values())
    rows = [[v.version, v.size, v.checksum, v.mtime, sorted(v.holders)] for v in versions]
    tomb = master.tombs.get(name)  # a deleted file's tombstone travels too: a report must not resurrect it
    return [master.next_version.get(name, 1), rows,
            [tomb.version, sorted(tomb.pending), tomb.at] if tomb is not None else None]


def entry_of(row: list[Any]) -> dict[str, Any]:
    """The master's entry form of a compact row (standby side)."""
    nv, rows, tomb = row
    entry: dict[str, Any] = {"next_version": int(nv), "versions": [
        {"version": r[0], "size": r[1], "checksum": r[2], "mtime": r[3], "holders": list(r[4])} for r in rows]}
    if tomb is not None:
        entry["tomb"] = {"version": tomb[0], "pending": list(tomb[1]), "at": tomb[2]}
    return entry


class SnapshotSource:
    """The primary's side of one transfer: the frozen part of the state at ``seq``, encoded into chunks
    by a producer thread that stays at most ``ahead`` chunks ahead of what the standby acknowledged
    (flow control), so the loop only hands out ready chunks."""

    def __init__(self, req: int, seq: int, term: int, head: dict[str, Any], jobs: list[dict[str, Any]],
                 names: list[str], master: Any, chunk_bytes: int, ahead: int, now: float) -> None:
        self.req = req
        self.seq = seq
        self.chunk_bytes = chunk_bytes
        self.ahead = max(2, ahead)
        self.records = self._records(head | {"seq": seq, "term": term, "jobs": len(jobs), "files": len(names)},
                                     jobs, names, master)
        self.cond = threading.Condition()
        self.chunks: dict[int, tuple[bytes, bool]] = {}  # produced and not yet acknowledged
        self.produced = 0  # chunks produced so far
        self.end: int | None = None  # index of the last chunk, once produced
        self.acked = 0  # the standby has every chunk below this
        self.max_wanted = 0
        self.waiting: set[int] = set()  # fetched before they were ready
        self.closed = False
        self.error = ""
        self.last_used = now
        self.bytes = 0
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"snapshot-{req}", daemon=True)
        self.thread.start()

    @staticmethod
    def _records(head: dict[str, Any], jobs: list[dict[str, Any]], names: list[str],
                 master: Any) -> Iterator[list[Any]]:
        yield ["head", head]
        for job in jobs:
            results = job.pop("results")
            yield ["job", job | {"results": {}}]
            items = list(results.items())
            for i in range(0, len(items), RESULTS_SLICE):
                yield ["results", job["job_id"], dict(items[i:i + RESULTS_SLICE])]
        for i in range(0, len(names), SDFS_SLICE):
            # Read now, not at S: whole-entry SDFS updates after S, replayed by the standby, fix it up.
            yield ["sdfs", {n: sdfs_row(master, n) for n in names[i:i + SDFS_SLICE]}]
        yield ["end", {"jobs": len(jobs), "files": len(names)}]

    def _chunks(self) -> Iterator[tuple[bytes, bool]]:
        buf = bytearray()
        for record in self.records:
            buf += _pack(record)
            while len(buf) > self.chunk_bytes:
                yield bytes(buf[: self.chunk_bytes]), False
                del buf[: self.chunk_bytes]
        yield bytes(buf), True

    def _run(self) -> None:
        try:
            for data, last in self._chunks():
                with self.cond:
                    while not self.closed and self.produced >= max(self.acked + self.ahead, self.max_wanted + 1):
                        self.cond.wait(1.0)
                    if self.closed:
                        return
                    self.chunks[self.produced] = (data, last)
                    self.bytes += len(data)
                    if last:
                        self.end = self.produced
                    self.produced += 1
        except Exception as exc:  # a bug here must fail the transfer, not the coordinator
            log.exception("snapshot transfer %d: producing the state stream failed", self.req)
            with self.cond:
                self.error = f"producing the state stream failed: {exc}"

    def fetch(self, index: int, have: int, now: float) -> tuple[bytes, bool] | None:
        """Chunk ``index`` and whether it is the last, or None when it is not produced yet (it is then
        handed out by :meth:`ready`). LookupError if it was freed, lies beyond the end, or failed."""
        with self.cond:
            self.last_used = now
            if self.error:
                raise LookupError(self.error)
            if have > self.acked:
                for i in range(self.acked, have):
                    self.chunks.pop(i, None)  # the standby has it: never needed again
                self.acked = have
            if index < self.acked:
                raise LookupError(f"chunk {index} of transfer {self.req} is gone")
            if self.end is not None and index > self.end:
                return None  # asked for before the standby knew where the stream ends: nothing to send
            self.max_wanted = max(self.max_wanted, index)
            self.cond.notify()
            found = self.chunks.get(index)
            if found is None:
                self.waiting.add(index)
            return found

    def ready(self) -> list[tuple[int, bytes, bool]]:
        """Chunks fetched before they were produced that are ready now."""
        with self.cond:
            out = [(i, *self.chunks[i]) for i in sorted(self.waiting) if i in self.chunks]
            self.waiting.difference_update(i for i, _, _ in out)
            if self.end is not None:
                self.waiting = {i for i in self.waiting if i <= self.end}  # past the end: never produced
            return out

    @property
    def done(self) -> bool:
        return self.end is not None and self.acked > self.end

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.chunks.clear()
            self.cond.notify()


class SnapshotReceiver:
    """The standby's side of one transfer: requests with bounded credit, in-order decoding, staging."""

    def __init__(self, req: int, window: int, now: float,
                 sink: Callable[[dict[str, dict[str, Any]]], None] | None = None) -> None:
        self.req = req
        # With a sink, SDFS entries are handed over slice by slice as they arrive (the standby applies
        # them to its master at once: no single long install at the end); only their names are kept.
        self.sink = sink
        self.names: set[str] = set()
        self.window = max(1, window)
        self.have = 0  # chunks received and decoded, in order
        self.requested = 0  # chunks asked for so far (indexes below this)
        self.early: dict[int, tuple[bytes, bool]] = {}  # arrived ahead of a missing one
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=0)
        self.state: dict[str, Any] | None = None
        self.jobs: dict[str, dict[str, Any]] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        self.done = False
        self.last_progress = now
        self.started = now
        self.bytes = 0
        self.resumes = 0
        self.end: int | None = None  # index of the last chunk, once seen

    def wanted(self) -> list[int]:
        """Chunk indexes to request now: keep ``window`` requests outstanding, never past the end."""
        if self.done:
            return []
        upto = self.have + self.window if self.end is None else min(self.have + self.window, self.end + 1)
        out = list(range(self.requested, upto))
        self.requested = max(self.requested, upto)
        return out

    def resume(self, now: float) -> list[int]:
        """No progress for a while: ask again from the first chunk missing (``have``)."""
        self.resumes += 1
        self.last_progress = now
        self.requested = self.have
        self.early.clear()
        return self.wanted()

    def add(self, index: int, data: bytes, last: bool, now: float) -> None:
        """Take one chunk; decode every chunk now in order. Raise SnapshotError on a bad stream."""
        if self.done or index < self.have:
            return  # a duplicate after a resume
        if last:
            self.end = index
        self.early[index] = (data, last)
        while self.have in self.early:
            chunk, is_last = self.early.pop(self.have)
            self.have += 1
            self.bytes += len(chunk)
            self.last_progress = now
            self.unpacker.feed(chunk)
            try:
                for record in self.unpacker:
                    self._record(record)
            except (ValueError, msgpack.UnpackException) as exc:
                raise SnapshotError(f"undecodable state stream at chunk {self.have - 1}: {exc}") from None
            if is_last:
                if not self.done:
                    raise SnapshotError("state stream ended without its end record")
                return

    def _record(self, record: Any) -> None:
        if not isinstance(record, list) or not record or not isinstance(record[0], str):
            raise SnapshotError("state record is not [kind, ...]")
        kind = record[0]
        try:
            if kind == "head":
                self.state = dict(record[1])
                return
            if self.state is None:
                raise SnapshotError(f"{kind} record before the head")
            if kind == "job":
                self.jobs[str(record[1]["job_id"])] = dict(record[1])
            elif kind == "results":
                self.jobs[str(record[1])]["results"].update(record[2])
            elif kind == "sdfs":
                entries = {name: entry_of(row) for name, row in record[1].items()}
                self.names.update(entries)
                if self.sink is not None:
                    self.sink(entries)
                else:
                    self.entries.update(entries)
            elif kind == "end":
                if len(self.jobs) != self.state["jobs"] or len(self.names) != self.state["files"]:
                    raise SnapshotError(f"state stream incomplete: {len(self.jobs)}/{self.state['jobs']} jobs, "
                                        f"{len(self.names)}/{self.state['files']} files")
                self.done = True
            else:
                raise SnapshotError(f"unknown state record {kind!r:.40}")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise SnapshotError(f"malformed {kind!r:.40} record: {exc!r:.200}") from None

    def result(self) -> tuple[dict[str, Any], int, int]:
        """The staged state in :meth:`Coordinator.snapshot` form, its seq and term (after ``done``);
        without ``sdfs`` when a sink took the SDFS entries."""
        if not self.done or self.state is None:
            raise SnapshotError("transfer not finished")
        head = self.state
        state = {k: v for k, v in head.items() if k not in ("seq", "term", "jobs", "files")}
        state["jobs"] = list(self.jobs.values())
        if self.sink is None:
            state["sdfs"] = {"entries": self.entries}
        return state, int(head["seq"]), int(head["term"])


def install(core: Any, rx: SnapshotReceiver, now: float) -> tuple[int, int]:
    """Install a finished transfer whose SDFS slices a sink already applied to ``core.master``: drop the
    names the primary did not have at S (deleted while this standby was behind), then restore the rest
    of the state in one piece. Returns (seq, term)."""
    state, seq, term = rx.result()
    master = core.master
    gone = [n for n in master.names() if n not in rx.names]
    if gone:
        master.apply_entries({n: {"next_version": 1, "versions": []} for n in gone})  # no versions, no tomb
    core.restore(state, seq, term, now)
    return seq, term
