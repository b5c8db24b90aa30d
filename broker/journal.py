"""The replicated state's durability: the sequenced op stream, the state store, start-up recovery.

The primary applies an op and journals it (:meth:`Journal.emit`: StateUpdate on the STATE topic +
the state store's WAL); the standby applies the primary's stream (:meth:`Journal.apply_update`)
and installs its snapshots (:meth:`Journal.restore`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from broker.state_store import StateStore
from common.protocol import StateUpdate, StateUpdates, Topic

if TYPE_CHECKING:
    from broker.coordinator import Coordinator

log = logging.getLogger("idunno.coordinator.journal")

# Ops not kept in the coordinator's state store: the SDFS master persists every file entry in its
# own SQLite before it journals it, so replaying an older entry from our journal could only undo a
# newer one (and 100k file entries would swell every snapshot).
NOT_STORED = frozenset({"sdfs.files"})
# Ops that can be megabytes each (a job's inputs, a batch of SDFS entries sized to fit one frame):
# published in a frame of their own, as before the batching, never joined to others past the
# standby's frame limit (max_frame_bytes: a larger frame is dropped and forces a full re-sync).
OWN_FRAME = frozenset({"sdfs.files", "job.add"})
# Small ops (a task's results: at most a few KB) joined per frame, at most this many.
MAX_OPS_PER_FRAME = 128


class Journal:
    def __init__(self, core: Coordinator, store: StateStore | None) -> None:
        self.core = core
        self.store = store  # durable journal + snapshots of the replicated state (None: memory only)
        self.state_seq = 0
        self.recovering = False  # journal ops of the start-up recovery although not (yet) primary
        self._durable_cache: dict[str, tuple[Any, dict[str, Any]]] = {}  # finished jobs' snapshot items
        # Ops journalled but not yet published: one frame per loop iteration (:meth:`publish`), not
        # one per op (issue #14). Their term, as a frame carries one.
        self.outbox: list[tuple[int, str, dict[str, Any]]] = []
        self.outbox_term = 0

    def journal(self, op: str, data: dict[str, Any]) -> None:
        """Publish one state change to the standby and append it to the state store (only the
        primary journals; and a coordinator recovering its own state at start-up, which stores
        without publishing)."""
        core = self.core
        if not core.is_primary and not self.recovering:
            return
        self.state_seq += 1
        if self.store is not None and op not in NOT_STORED:
            self.store.append(self.state_seq, core.term, op, data)
        if core.is_primary:
            if self.outbox and (self.outbox_term != core.term or op in OWN_FRAME
                                or len(self.outbox) >= MAX_OPS_PER_FRAME):
                self.publish()
            self.outbox_term = core.term
            self.outbox.append((self.state_seq, op, data))
            if op in OWN_FRAME:
                self.publish()

    def publish(self) -> None:
        """Send the ops journalled since the last call to the standby, in order, in one frame."""
        if not self.outbox:
            return
        ops, self.outbox = self.outbox, []
        if len(ops) == 1:
            seq, op, data = ops[0]
            msg: StateUpdate | StateUpdates = StateUpdate(seq, self.outbox_term, op, data)
        else:
            msg = StateUpdates(ops[0][0], self.outbox_term, [o[1] for o in ops], [o[2] for o in ops])
        self.core.net.publish(Topic.STATE, msg)

    def emit(self, op: str, data: dict[str, Any], now: float) -> None:
        self.core.state.apply_op(op, data, now)
        self.journal(op, data)

    def apply_update(self, seq: int, term: int, op: str, data: dict[str, Any], now: float) -> None:
        """Standby: apply one op of the primary's stream and keep it in the state store."""
        self.core.state.apply_op(op, data, now)
        self.state_seq = seq
        self.core.term = max(self.core.term, term)
        if self.store is not None and op not in NOT_STORED:
            self.store.append(seq, term, op, data)

    def commit(self) -> None:
        """Make every op so far durable (a write into the WAL: survives the process's death), and
        publish them to the standby (the loop's group commit, and before answering a client)."""
        self.publish()
        if self.store is not None:
            self.store.commit(self.state_seq)

    def results_written(self, job_id: str, version: int, now: float) -> bool:
        """The result writer put ``results/<job_id>`` as ``version``: record it (primary only).

        False if it cannot be recorded (not primary any more, or a write is already recorded):
        that SDFS version then stays as an unrecorded rewrite of the same content.
        """
        job = self.core.state.jobs.jobs.get(job_id)
        if not self.core.is_primary or job is None or job.results_version is not None:
            return False
        self.emit("job.results_written", {"job_id": job_id, "version": version}, now)
        self.commit()
        return True

    def write_missing_results(self) -> list[str]:
        """Hand every finished job whose results file is not recorded as written to the writer
        (a new primary after a promotion or a restart owes them; the writer skips duplicates)."""
        owed = [j for j in self.core.state.jobs.jobs.values() if j.finished is not None and j.results_version is None]
        for job in owed:
            self.core.on_job_done(job)
        return [j.job_id for j in owed]

    def durable_items(self) -> list[tuple[str, Any]]:
        """The state for a compacted snapshot in the state store: the parts of the state's head, one
        item per job (so no item is the whole state), without SDFS: the master keeps its own SQLite.
        Built fresh (the store packs it on another thread while the loop goes on)."""
        items: list[tuple[str, Any]] = list(self.core.state.head().items())
        cache: dict[str, tuple[Any, dict[str, Any]]] = {}
        for j in self.core.state.jobs.jobs.values():
            # A finished job does not change (but for a late duplicate or its results file): its
            # item is built once, not again at every compaction while the loop waits.
            key = j.durable_key()
            hit = self._durable_cache.get(j.job_id)
            item = hit[1] if key is not None and hit is not None and hit[0] == key else j.durable()
            if key is not None:
                cache[j.job_id] = (key, item)
            items.append(("job", item))
        self._durable_cache = cache
        return items

    def restore(self, state: dict[str, Any], seq: int, term: int, now: float) -> None:
        """Install the primary's snapshot (standby). The state store starts a new history from it."""
        self.core.state.restore(state, now)
        self.state_seq = seq
        self.core.term = max(self.core.term, term)
        if self.store is not None:
            # Our journal may be another history with the same seq numbers (a demoted primary):
            # ops from here on belong to the new one, which becomes the restorable state once the
            # snapshot below is on disk (until then a restart finds the old, consistent one).
            self.store.new_lineage(seq)
            self.store.compact(seq, self.core.term, self.durable_items())

    def maybe_compact(self) -> bool:
        """Compact the state store when its journal has grown past the threshold (loop thread)."""
        if self.store is None or not self.store.should_compact():
            return False
        self.store.compact(self.state_seq, self.core.term, self.durable_items())
        return True

    def load_state(self, now: float) -> dict[str, int]:
        """Start-up: the state store's snapshot and journal tail, then the recovery of what was in
        flight (re-queued: those queries run again; a late answer still counts once). Before serving."""
        if self.store is None:
            return {"jobs": 0, "ops": 0, "requeued": 0}
        core, state = self.core, self.core.state
        loaded = self.store.load()
        snapshot: dict[str, Any] = {"jobs": []}
        for kind, value in loaded.items:
            if kind == "job":
                snapshot["jobs"].append(value)
            else:
                snapshot[kind] = value
        try:
            state.restore(snapshot, now)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("coordinator state snapshot unusable (%s): starting from its journal only", exc)
            state.reset()
        ops = 0
        for seq, _term, op, data in self.store.journal_ops(loaded.seq, loaded):
            try:
                state.apply_op(op, data, now)
            except Exception as exc:  # one bad op must not keep the coordinator from starting
                loaded.skipped += 1
                log.warning("stored op %d (%s) could not be applied: %s; skipped", seq, op, exc)
            ops += 1
        self.state_seq = loaded.last_seq
        core.term = max(core.term, loaded.term)
        in_flight = self._requeue_in_flight(now)
        if state.jobs.jobs or ops:
            log.info("restored %d jobs from the state store (%d journal ops after the snapshot at seq %d, "
                     "%d in-flight tasks re-queued, %d unreadable entries skipped); state seq %d, term %d",
                     len(state.jobs.jobs), ops, loaded.seq, in_flight, loaded.skipped, self.state_seq, core.term)
        return {"jobs": len(state.jobs.jobs), "ops": ops, "requeued": in_flight, "skipped": loaded.skipped}

    def _requeue_in_flight(self, now: float) -> int:
        """What was out at workers when the coordinator stopped runs again (journalled, not published)."""
        self.recovering = True
        try:
            in_flight = list(self.core.state.jobs.tasks)
            for task_id in in_flight:
                self.emit("task.requeue", {"task_id": task_id}, now)
        finally:
            self.recovering = False
        self.commit()
        return len(in_flight)
