"""The coordinator's logic, free of sockets: membership, SDFS master, jobs, scheduling, statistics.

``handle(identity, msg, now)`` processes one decoded message and ``tick(now)`` runs the timers;
everything leaves through ``self.net`` (``send`` to a ROUTER peer, ``publish`` on PUB). The socket
loop lives in :mod:`broker.server`; unit tests drive this class with an in-memory ``Net``.

State changes that the standby must see go through :meth:`emit` (apply locally + journal a
sequenced ``StateUpdate``); the standby applies the same ops with :meth:`apply_op`, so both sides
run one code path (zguide Clone: snapshot + sequenced updates).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.jobs import Job, JobState, JobTable, TaskInfo, parse_answers
from broker.scheduler import Candidate, make_scheduler
from broker.snapshot import MAX_TRANSFERS, SnapshotSource
from broker.state_store import StateStore
from broker.stats import rate_gap, summarize
from common.commands import AUTO, COMMANDS, check_args
from common.config import Config
from common.failure_detector import LOCAL_STALL
from common.identity import PULSE_SUFFIX, split_node_id
from common.membership import Member, MemberRegistry, MembershipEvent
from common.modelnames import MODEL_NAMES, NOOP, resolve_model
from common.protocol import (
    Command,
    CoordinatorHeartbeat,
    Delete,
    Error,
    ErrorCode,
    Heartbeat,
    Join,
    Leave,
    ListFiles,
    Locate,
    Located,
    Message,
    Ok,
    Preload,
    Pulse,
    PutBegin,
    PutCommit,
    PutPlan,
    PutReplace,
    Ready,
    Rejoin,
    ReportBad,
    ResultAck,
    StateChunk,
    StateFetch,
    StateRequest,
    StateUpdate,
    Stored,
    Task,
    TaskResult,
    Topic,
    ViewRequest,
    ViewSnapshot,
    ViewUpdate,
    Welcome,
)
from common.security import COORDINATOR, WORKER, grant
from sdfs.master import MasterError, SdfsMaster

log = logging.getLogger("idunno.coordinator")

# The scans over every member and task (failure detection, task timeouts, stale slots) run at most
# this often, not on every message: each is O(workers), and tick runs after every message.
SCAN_INTERVAL = 0.02
SLOW_MESSAGE = 0.1  # handling one message should never hold the loop longer than this (seconds)

PRIMARY, STANDBY, PROBING = "primary", "standby", "probing"

# Messages whose node_id names their sender: it must equal the ROUTER identity the frame came
# from (a worker's DEALER identity is its node id). ReportBad is not one of them: its node_id
# names the replica being reported, and any reader may report one.
SENDER_NAMED: tuple[type[Message], ...] = (Join, Heartbeat, Leave, Ready, TaskResult, Stored)

# Who may send what, by the CURVE role of the sender's key (the ZAP User-Id of the frame, never a
# field of the message). Types not listed here are open to every authenticated key (commands, SDFS
# metadata). New coordinator-to-coordinator types (state transfer) belong with StateRequest.
# In plain mode (--insecure) there is no role to check: ``handle(..., sender_role=None)`` trusts every sender.
WORKER_ONLY = frozenset({WORKER})
COORDINATOR_ONLY = frozenset({COORDINATOR})
SENDER_ROLES: dict[type[Message], frozenset[str]] = {
    **{t: WORKER_ONLY for t in (Join, Heartbeat, Pulse, Leave, Ready, TaskResult, Stored)},
    StateRequest: COORDINATOR_ONLY,
    StateFetch: COORDINATOR_ONLY,  # the chunks of a state transfer: only the other coordinator's key
}

MAX_ELAPSED = 86_400.0  # seconds of compute for one batch: anything longer is not a measurement

# Ops not kept in the coordinator's state store: the SDFS master persists every file entry in its
# own SQLite before it journals it, so replaying an older entry from our journal could only undo a
# newer one (and 100k file entries would swell every snapshot).
NOT_STORED = frozenset({"sdfs.files"})


class Net(Protocol):
    def send(self, identity: bytes, msg: Message) -> bool: ...
    def publish(self, topic: bytes, msg: Message) -> None: ...


class CommandError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class WorkerSlot:
    """Per-worker scheduling state, kept beside (keyed like) the membership registry."""

    # Credit is derived, never counted up and down: the slots of the worker's latest Ready minus
    # the tasks we know it holds. A Ready repeated (two Welcomes after a retried Join) or crossing
    # tasks on the wire therefore cannot hand the worker more than its slots.
    slots: int = 0
    ready: bool = False  # no dispatch before the worker's first Ready after a (re)join
    # Task ids sent (or held across a re-attach) and not yet answered, with the time they were added.
    outstanding: dict[str, float] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    cost: float = 0.0  # EWMA seconds per image (any model) on this worker
    costs: dict[str, float] = field(default_factory=dict)  # EWMA seconds per image, per model, on this worker
    # A non-worker key spoke under this worker's routing id (ROUTER handover gave it the id): send
    # it nothing until the worker's own key is heard on that id again.
    hijacked: bool = False

    @property
    def credit(self) -> int:
        return max(0, self.slots - len(self.outstanding)) if self.ready and not self.hijacked else 0


class Coordinator:
    def __init__(
        self,
        cfg: Config,
        addr: str,
        net: Net,
        role: str = PRIMARY,
        term: int = 1,
        db_path: str | None = None,
        scheduler: str = "fair-time",
        on_job_done: Callable[[Job], None] | None = None,
        clock: Callable[[], float] = time.time,
        models: Collection[str] = MODEL_NAMES,
        store: StateStore | None = None,
        persist_term: Callable[[int], None] | None = None,
        grant_key: bytes | None = None,
    ) -> None:
        self.cfg = cfg
        self.grant_key = grant_key  # signs write grants (common/security.py); None in --insecure mode
        self.store = store  # durable journal + snapshots of the replicated state (None: memory only)
        self.persist_term = persist_term or (lambda term: None)
        self._term = self._persisted_term = term  # the caller loaded it from where it persists it
        self.recovering = False  # journal ops of the start-up recovery although not (yet) primary
        self._durable_cache: dict[str, tuple[Any, dict[str, Any]]] = {}  # finished jobs' snapshot items
        self.clock = clock  # wall clock for statistics (replicated to the standby); timers use `now`
        self.models = frozenset(models)  # what `submit` accepts (torchvision classifiers and noop)
        self.addr = addr
        self.net = net
        self.role = role
        self.registry = MemberRegistry(cfg.detector_params())
        self.slots: dict[str, WorkerSlot] = {}
        self.charged: dict[str, int] = {}  # task id -> images the scheduler was charged (primary only)
        self.master = SdfsMaster(cfg, self.storage_nodes, db_path, journal=self.journal)
        self.jobs = JobTable()
        self.scheduler = make_scheduler(scheduler)
        self.on_job_done = on_job_done or (lambda job: None)
        self.state_seq = 0
        self.cost: dict[str, float] = {}  # EWMA seconds per image, per model
        self.next_repair = 0.0
        self.next_scan = 0.0
        self.next_heartbeat = 0.0
        self.busy_seconds: dict[str, float] = {}  # compute time per worker (metrics)
        self.failures_detected = 0
        self.dropped: dict[str, int] = {}  # messages refused, by reason (`info`, metrics)
        self._drop_logged: dict[str, float] = {}
        self.last_vote = -1e9  # last time a worker asked this (non-primary) coordinator for service
        self.max_stall = 0.0  # longest gap between two iterations of the socket loop (metric)
        self.slowest: tuple[str, float] = ("", 0.0)  # the message type that took longest to handle, and how long
        self.events: list[dict[str, Any]] = []  # timeline for reports: job added, worker failed, ...
        self.synced = False  # standby: holds the primary's snapshot and follows its updates (set by the server)
        self.transfers: dict[bytes, SnapshotSource] = {}  # snapshot transfers being served, by standby
        self.handlers: dict[type[Message], Callable[[bytes, Any, float], None]] = {
            Join: self.on_join,
            Heartbeat: self.on_heartbeat,
            Pulse: self.on_pulse,
            Leave: self.on_leave,
            ViewRequest: self.on_view_request,
            PutBegin: self.on_put_begin,
            PutCommit: self.on_put_commit,
            PutReplace: self.on_put_replace,
            Locate: self.on_locate,
            Delete: self.on_delete,
            ListFiles: self.on_ls,
            ReportBad: self.on_report_bad,
            Stored: self.on_stored,
            Ready: self.on_ready,
            TaskResult: self.on_result,
            Command: self.on_command,
            StateRequest: self.on_state_request,
            StateFetch: self.on_state_fetch,
        }
        self.ops: dict[str, Callable[[dict[str, Any], float], None]] = {
            "job.add": self._op_job_add,
            "job.start": self._op_job_start,
            "job.batch": self._op_job_batch,
            "job.cancel": self._op_job_cancel,
            "task.dispatch": self._op_task_dispatch,
            "task.result": self._op_task_result,
            "task.requeue": self._op_task_requeue,
            "job.results_written": self._op_job_results_written,
            "member": self._op_member,
            "sdfs.files": self._op_sdfs_files,
            "event": self._op_event,
        }
        self.commands: dict[str, Callable[[dict[str, Any], float], Any]] = {
            name: getattr(self, f"cmd_{name}") for name in COMMANDS
        }

    # ------------------------------------------------------------------------------------------
    # helpers

    def storage_nodes(self) -> dict[str, str]:
        return {m.node_id: m.data_addr for m in self.registry.alive("worker") if m.data_addr}

    def reply_error(self, ident: bytes, req: int, code: str, message: str) -> None:
        self.net.send(ident, Error(req, code, message))

    def send_outbox(self, outbox: list[tuple[str, Message]]) -> None:
        for node_id, msg in outbox:
            self.net.send(node_id.encode(), msg)

    @property
    def term(self) -> int:
        return self._term

    @term.setter
    def term(self, value: int) -> None:
        # Raft's persisted currentTerm: a higher term is on disk (fsync'd by ``persist_term``)
        # before anything can announce it, whichever path raised it (promotion, a peer heard,
        # a snapshot installed), so no restart ever hands out a term number twice.
        if value > self._persisted_term:
            self.persist_term(value)
            self._persisted_term = value
        self._term = value

    def journal(self, op: str, data: dict[str, Any]) -> None:
        """Publish one state change to the standby and append it to the state store (only the
        primary journals; and a coordinator recovering its own state at start-up, which stores
        without publishing)."""
        if self.role != PRIMARY and not self.recovering:
            return
        self.state_seq += 1
        if self.store is not None and op not in NOT_STORED:
            self.store.append(self.state_seq, self.term, op, data)
        if self.role == PRIMARY:
            self.net.publish(Topic.STATE, StateUpdate(self.state_seq, self.term, op, data))

    def apply_update(self, seq: int, term: int, op: str, data: dict[str, Any], now: float) -> None:
        """Standby: apply one op of the primary's stream and keep it in the state store."""
        self.apply_op(op, data, now)
        self.state_seq = seq
        self.term = max(self.term, term)
        if self.store is not None and op not in NOT_STORED:
            self.store.append(seq, term, op, data)

    def commit(self) -> None:
        """Make every op so far durable (a write into the WAL: survives the process's death)."""
        if self.store is not None:
            self.store.commit(self.state_seq)

    def emit(self, op: str, data: dict[str, Any], now: float) -> None:
        self.apply_op(op, data, now)
        self.journal(op, data)

    def apply_op(self, op: str, data: dict[str, Any], now: float) -> None:
        handler = self.ops.get(op)
        if handler is None:
            log.warning("unknown state op %r ignored", op)
            return
        handler(data, now)

    def event(self, kind: str, detail: str, now: float) -> None:
        self.emit("event", {"ts": self.clock(), "kind": kind, "detail": detail}, now)

    def drop(self, reason: str, now: float, fmt: str, *args: Any) -> None:
        """Refuse a message: count it by reason, and log (at most one line per reason per second,
        so a flood of hostile frames cannot become a flood of log records)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if now - self._drop_logged.get(reason, -math.inf) >= 1.0:
            self._drop_logged[reason] = now
            log.warning(f"{fmt} ({reason}: %d dropped so far)", *args, self.dropped[reason])

    # ------------------------------------------------------------------------------------------
    # entry points

    def handle(self, ident: bytes, msg: Message, now: float, sender_role: str | None = None) -> None:
        """One message from ROUTER peer ``ident`` whose key has CURVE ``sender_role`` (None: plain mode)."""
        handler = self.handlers.get(type(msg))
        if handler is None:
            req = getattr(msg, "req", 0)
            self.reply_error(ident, req, ErrorCode.BAD_REQUEST, f"{msg.TYPE} is not a coordinator request")
            return
        # The one place that checks who sent a message: only a worker key speaks the worker protocol
        # and only a coordinator key asks for the state; a node speaks only for itself. Checked
        # before anything else, so a forged Join or Heartbeat is no failover vote either, and a
        # message the sender may not send gets no answer at all.
        allowed = SENDER_ROLES.get(type(msg))
        slot = self.slots.get(ident.decode(errors="replace")) if sender_role is not None else None
        if slot is not None:
            slot.hijacked = sender_role != WORKER
        if sender_role is not None and allowed is not None and sender_role not in allowed:
            self.drop("wrong_role", now, "%s from a %s key (sender %r) dropped",
                      msg.TYPE, sender_role or "unknown", ident[:80])
            return
        if isinstance(msg, SENDER_NAMED) and ident != msg.node_id.encode() or (
            # A worker's pulse sidecar speaks for its worker under the node id + /pulse identity.
            isinstance(msg, Pulse) and ident != (msg.node_id + PULSE_SUFFIX).encode()
        ):
            self.drop("forged_sender", now, "%s claiming to be %r from sender %r dropped",
                      msg.TYPE, msg.node_id[:80], ident[:80])
            return
        # A standby answers only questions about itself (`members` shows its role and term);
        # everything else goes to the primary, so a client never acts on a stale copy.
        standby_ok = isinstance(msg, (StateRequest, StateFetch, ViewRequest)) or (
            isinstance(msg, Command) and msg.name == "members"
        )
        if self.role != PRIMARY and not standby_ok:
            self.on_not_primary(ident, msg, now)
            return
        try:
            handler(ident, msg, now)
        except Exception as exc:  # a handler bug must never take the coordinator down
            log.exception("handler for %s failed", msg.TYPE)
            self.reply_error(ident, getattr(msg, "req", 0), ErrorCode.INTERNAL, f"internal error: {exc}")

    def on_not_primary(self, ident: bytes, msg: Message, now: float) -> None:
        # A worker talking to the standby is a vote that the primary is gone (Binary Star).
        if isinstance(msg, (Join, Heartbeat)):
            self.last_vote = now
        req = getattr(msg, "req", None)
        if req is not None:
            self.reply_error(ident, req, ErrorCode.NOT_PRIMARY, f"{self.addr} is {self.role}, not primary")
        elif isinstance(msg, (Join, Heartbeat)):
            self.net.send(ident, Error(0, ErrorCode.NOT_PRIMARY, f"{self.addr} is {self.role}"))

    def tick(self, now: float, expire: bool = True) -> None:
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.cfg.heartbeat_interval
            self.net.publish(
                Topic.HEARTBEAT,
                CoordinatorHeartbeat(
                    self.addr, self.role, self.term, self.registry.epoch, self.registry.seq, self.state_seq
                ),
            )
        if self.transfers:
            self._serve_transfers(now)
            self._expire_transfers(now)
        if self.role != PRIMARY:
            return
        if not expire:
            return  # a backlog of unread messages may hold heartbeats: read them before blaming anyone
        if now >= self.next_scan or now < self.next_scan - SCAN_INTERVAL:  # (or the clock went back)
            self.next_scan = now + SCAN_INTERVAL
            for ev in self.registry.expire(now):
                self.failures_detected += 1
                log.warning("member %s failed (silent for %.2fs)", ev.member.node_id, now - ev.member.last_seen)
                self.member_gone(ev, now)
            for task in [t for t in self.jobs.tasks.values() if t.deadline < now]:
                log.warning("task %s on %s timed out; re-queued", task.task_id, task.worker)
                self.emit("task.requeue", {"task_id": task.task_id}, now)
            self._expire_unknown_outstanding(now)
        if now >= self.next_repair:
            self.next_repair = now + self.cfg.repair_interval
            self.send_outbox(self.master.repair(now))
        self.dispatch(now)

    def loop_stalled(self, seconds: float) -> None:
        """The socket loop reports a gap between two of its iterations (``run`` measures it).

        A stalled loop (SIGSTOP, swap, CPU starvation, a long message) left heartbeats waiting in
        our socket: they are not late, so the stall is not counted against any member.
        """
        self.max_stall = max(self.max_stall, seconds)
        if seconds > LOCAL_STALL:
            if seconds > self.cfg.heartbeat_interval:
                log.warning("coordinator loop stalled for %.2fs; not blaming members for it", seconds)
            self.registry.excuse_all(seconds)

    def note_handling(self, kind: str, seconds: float) -> None:
        """The socket loop reports how long one message took to handle (the slowest is kept)."""
        if seconds > self.slowest[1]:
            self.slowest = (kind, seconds)
            if seconds > SLOW_MESSAGE:
                log.warning("handling one %s message took %.0f ms", kind, seconds * 1000)

    def _expire_unknown_outstanding(self, now: float) -> None:
        """Free slots held by task ids we have no task for (listed in a Join, answered elsewhere).

        Known tasks leave ``outstanding`` on their result or their timeout; an id this coordinator
        never dispatched would otherwise keep its slot until a result that may never come here.
        """
        for node, slot in self.slots.items():
            stale = [t for t, since in slot.outstanding.items()
                     if t not in self.jobs.tasks and now - since > self.cfg.task_timeout_min]
            for t in stale:
                log.warning("no result for %s from %s in %.0fs: freeing its slot", t, node, self.cfg.task_timeout_min)
                del slot.outstanding[t]

    def next_deadline(self, now: float) -> float:
        deadlines = [self.next_heartbeat, self.next_repair if self.role == PRIMARY else now + 1.0]
        if any(t.waiting for t in self.transfers.values()):
            deadlines.append(now + 0.005)  # a fetched chunk is being produced off the loop
        d = self.registry.next_deadline()
        if d is not None and self.role == PRIMARY:
            deadlines.append(d)
        return min(deadlines)

    # ------------------------------------------------------------------------------------------
    # membership

    def publish_member(self, ev: MembershipEvent, now: float) -> None:
        member = ev.member.public()
        self.net.publish(Topic.VIEW, ViewUpdate(ev.seq, ev.epoch, str(ev.event), member))
        self.journal("member", {"event": str(ev.event), "member": member, "seq": ev.seq, "epoch": ev.epoch})

    def on_join(self, ident: bytes, m: Join, now: float) -> None:
        try:
            split_node_id(m.node_id)
        except ValueError as exc:
            self.net.send(ident, Error(0, ErrorCode.BAD_REQUEST, str(exc)))
            return
        known = self.registry.get(m.node_id)
        if known is not None and known.state != "alive":
            # A member declared failed (or that left) never comes back under the same id: the
            # node must start a new incarnation, so nobody trusts state from before its absence.
            self.net.send(ident, Rejoin(f"{m.node_id} was declared {known.state}"))
            return
        for gone in self.registry.superseded_by(m.node_id):
            log.info("member %s replaced by its new incarnation %s", gone.member.node_id, m.node_id)
            self.member_gone(gone, now)
        member = Member(m.node_id, m.role, m.data_addr, joined_at=self.clock())
        ev = self.registry.join(member, now)
        if ev is not None:
            log.info("member %s joined (%s, data %s)", m.node_id, m.role, m.data_addr or "-")
            self.publish_member(ev, now)
            self.event("join", m.node_id, now)
        # Credit comes with the worker's Ready; results of the tasks it still holds will return credit.
        self.slots[m.node_id] = WorkerSlot(outstanding=dict.fromkeys(m.inflight, now))
        self.net.send(ident, Welcome(m.node_id, self.term, self.registry.epoch))
        self.send_outbox(self.master.node_report(m.node_id, m.store))
        # Tasks the node still works on keep their queries out of the pending queue.
        live_tasks = set(m.inflight)
        for task in self.jobs.tasks_of(m.node_id):
            if task.task_id not in live_tasks:
                self.emit("task.requeue", {"task_id": task.task_id}, now)
            elif (job := self.jobs.jobs.get(task.job_id)) is not None:
                # A takeover restored it with the minimum timeout; a long batch deserves its own.
                task.deadline = max(task.deadline, now + self.task_timeout(job, m.node_id))

    def on_heartbeat(self, ident: bytes, m: Heartbeat, now: float) -> None:
        if not self.registry.heartbeat(m.node_id, now, m.busy):
            self.net.send(ident, Rejoin(f"{m.node_id} is not a live member here"))
            return
        slot = self.slots.get(m.node_id)
        if slot is not None:
            slot.models = tuple(m.models)
        elif self.role == PRIMARY:
            # A member we restored (state store) heartbeating as if joined: this coordinator was
            # restarted at the address the worker follows, so the worker sees no new primary to
            # join. A Welcome re-attaches it (same incarnation; it answers with its Ready and
            # re-sends unacknowledged results), instead of a Rejoin that would cost a new identity.
            self.slots[m.node_id] = WorkerSlot(models=tuple(m.models))
            log.info("member %s re-attached after this coordinator's restart", m.node_id)
            self.net.send(ident, Welcome(m.node_id, self.term, self.registry.epoch))

    def on_pulse(self, ident: bytes, m: Pulse, now: float) -> None:
        self.registry.pulse(m.node_id, now)  # handle() checked that the sender is the member's own sidecar

    def on_leave(self, ident: bytes, m: Leave, now: float) -> None:
        ev = self.registry.leave(m.node_id)
        if ev is not None:
            log.info("member %s left", m.node_id)
            self.member_gone(ev, now)

    def member_gone(self, ev: MembershipEvent, now: float) -> None:
        node = ev.member.node_id
        self.publish_member(ev, now)
        self.event(str(ev.event), node, now)
        self.slots.pop(node, None)
        for task in self.jobs.tasks_of(node):
            self.emit("task.requeue", {"task_id": task.task_id}, now)
        self.master.node_down(node)
        # Re-replicate soon, but let simultaneous failures surface first so that no copy is planned
        # from (or onto) a node that is already dead but not yet declared.
        self.next_repair = min(self.next_repair, now + self.cfg.heartbeat_interval)

    def on_view_request(self, ident: bytes, m: ViewRequest, now: float) -> None:
        self.net.send(ident, ViewSnapshot(m.req, self.registry.seq, self.registry.epoch, self.registry.view()))

    # ------------------------------------------------------------------------------------------
    # SDFS

    def _master_call(self, ident: bytes, req: int, fn: Callable[[], Message]) -> None:
        try:
            self.net.send(ident, fn())
        except MasterError as exc:
            self.reply_error(ident, req, exc.code, str(exc))

    def on_put_begin(self, ident: bytes, m: PutBegin, now: float) -> None:
        self._master_call(ident, m.req, lambda: PutPlan(m.req, self._granted(self.master.begin_put(m.files, now))))

    def on_put_replace(self, ident: bytes, m: PutReplace, now: float) -> None:
        self._master_call(ident, m.req, lambda: PutPlan(m.req, self._granted(self.master.replace_targets(m.puts))))

    def _granted(self, plans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Sign each planned write: a data node stores a version only with the master's grant for it."""
        for p in plans:
            put = self.master.pending.get(p["put_id"])
            p["grant"] = (grant(self.grant_key, put.name, put.version, put.size, put.checksum)
                          if self.grant_key and put is not None else "")
        return plans

    def on_put_commit(self, ident: bytes, m: PutCommit, now: float) -> None:
        failed, out = self.master.commit_put(m.commits, now)
        self.send_outbox(out)
        self.net.send(ident, Ok(m.req, {"failed": failed}))

    def on_locate(self, ident: bytes, m: Locate, now: float) -> None:
        self._master_call(ident, m.req, lambda: Located(m.req, m.name, self.master.locate(m.name, m.count)))

    def on_delete(self, ident: bytes, m: Delete, now: float) -> None:
        def run() -> Message:
            n, out = self.master.delete(m.name)
            self.send_outbox(out)
            return Ok(m.req, {"deleted_versions": n})

        self._master_call(ident, m.req, run)

    def on_ls(self, ident: bytes, m: ListFiles, now: float) -> None:
        self.net.send(ident, Ok(m.req, {"files": self.master.ls(m.pattern)}))

    def on_report_bad(self, ident: bytes, m: ReportBad, now: float) -> None:
        self.send_outbox(self.master.report_bad(m.node_id, m.name, m.version))
        self.net.send(ident, Ok(m.req))
        self.next_repair = now

    def on_stored(self, ident: bytes, m: Stored, now: float) -> None:
        if not m.ok:
            log.warning("re-replication of %s v%d to %s failed: %s", m.name, m.version, m.node_id, m.error)
        self.send_outbox(self.master.stored(m.node_id, m.name, m.version, m.ok, m.checksum))

    # ------------------------------------------------------------------------------------------
    # inference

    def on_ready(self, ident: bytes, m: Ready, now: float) -> None:
        if not self.registry.is_alive(m.node_id):
            self.net.send(ident, Rejoin("ready from a non-member"))
            return
        slot = self.slots.setdefault(m.node_id, WorkerSlot())
        slot.ready = True
        slot.slots = max(0, min(m.slots, 64))
        slot.models = tuple(m.models)
        self.dispatch(now)

    def task_timeout(self, job: Job, worker: str, n: int | None = None) -> float:
        per_image = self.cost.get(job.model) or self.slots.get(worker, WorkerSlot()).cost or 1.0
        n = n or job.batch_size or self.cfg.max_batch_size
        return max(self.cfg.task_timeout_min, 10 * per_image * n * self.cfg.worker_credit)

    def batch_for(self, job: Job, slot: WorkerSlot) -> int:
        """The job's batch size; for `auto` (dynamic batching, as Triton's), the largest batch whose
        predicted compute on this worker stays under the job's latency target, from this worker's
        measured cost per image for the model (else the cluster's), one image while nothing is measured."""
        if job.batch_size:
            return job.batch_size
        cost = slot.costs.get(job.model) or self.cost.get(job.model)
        if not cost:
            return 1
        target = job.latency_target or self.cfg.default_latency_target
        return max(1, min(self.cfg.max_batch_size, int(target / cost + 1e-9)))  # 0.36 / 0.09 is 3.999...

    def queued_work(self, slot: WorkerSlot) -> float:
        """Seconds of compute a worker still has to do on the tasks it holds, from their unanswered
        queries and its measured cost per image for each model (0 while nothing is measured)."""
        total = 0.0
        for task_id in slot.outstanding:
            task = self.jobs.tasks.get(task_id)
            job = self.jobs.jobs.get(task.job_id) if task is not None else None
            if job is not None:
                cost = slot.costs.get(job.model, 0.0)
                if cost:
                    total += cost * sum(1 for i in task.indexes if i not in job.results)
        return total

    def dispatch(self, now: float) -> None:
        """Give every free worker slot a batch from the job the scheduler picks."""
        if self.role != PRIMARY:
            return
        # The free slots are found once per pass, in a heap by credit (ties: registry order, as max()
        # gave): only the worker just given a task changes within the pass, so it alone is pushed back.
        # Re-scanning every worker per task made a pass O(workers^2): 1,000 simulated workers took
        # 10 s to fill their slots (tests/test_scale.py).
        def eligible(s: WorkerSlot) -> bool:
            return s.credit > 0 and self.queued_work(s) <= self.cfg.prefetch_lead

        free = [(-s.credit, i, node) for i, (node, s) in enumerate(self.slots.items())
                if eligible(s) and self.registry.is_alive(node)]
        heapq.heapify(free)
        while free:
            backlog = self.jobs.backlogged()
            if not backlog:
                return
            _, order, node = heapq.heappop(free)
            slot = self.slots[node]
            pick = self.scheduler.pick(Candidate(j.job_id, j.weight, j.model) for j in backlog)
            if pick is None:
                return
            job = self.jobs.jobs[pick.job_id]
            # Slow start: a new job's batches grow 1, 1, 2, 4, ... up to its batch size, so its first
            # result comes after one image's compute, not a whole batch's. Charging is per image, so
            # the scheduler's fairness accounting does not change.
            n = min(self.batch_for(job, slot), len(job.pending))
            if self.cfg.slow_start:
                n = min(n, max(1, len(job.dispatches)))
            indexes = list(itertools.islice(job.pending, n))
            task_id = self.jobs.next_task_id(job.job_id, self.term)
            self.emit(
                "task.dispatch",
                {"task_id": task_id, "job_id": job.job_id, "worker": node, "indexes": indexes,
                 "dispatched": self.clock()},
                now,
            )
            task = self.jobs.tasks[task_id]
            task.deadline = now + self.task_timeout(job, node, n)
            queries = [{"qid": job.qid(i), "input": job.inputs[i][0], "version": job.inputs[i][1]} for i in indexes]
            slot.outstanding[task_id] = now
            self.scheduler.charge(job.job_id, n, job.weight)
            self.charged[task_id] = n
            if not self.net.send(node.encode(), Task(task_id, job.job_id, job.model, self.term, queries,
                                                     job.weights)):
                log.warning("worker %s unreachable; task %s re-queued", node, task_id)
                self.emit("task.requeue", {"task_id": task_id}, now)
                continue  # not pushed back: for this pass only, a failed send is usually a reconnect
            if eligible(slot):
                heapq.heappush(free, (-slot.credit, order, node))

    def on_result(self, ident: bytes, m: TaskResult, now: float) -> None:
        self.net.send(ident, ResultAck(m.task_id, m.final))
        if not self.registry.is_alive(m.node_id):
            log.info("late result %s from %s (not a live member) dropped", m.task_id, m.node_id)
            return
        task = self.jobs.tasks.get(m.task_id)
        try:
            job, answers = self._check_result(m, task)
        except ValueError as exc:
            self.drop("bad_result", now, "result %.80s from %s dropped: %s", m.task_id, m.node_id, exc)
            return
        slot = self.slots.get(m.node_id)
        if slot is not None and m.final:
            slot.outstanding.pop(m.task_id, None)
        if task is not None and not m.final:
            task.deadline = now + self.task_timeout(job, m.node_id)  # a streaming task is making progress
        results: dict[str, dict[str, Any]] = {}
        duplicates = 0
        completed_at = self.clock()
        for idx, (top5, error) in answers.items():
            if idx in job.results:
                duplicates += 1  # a re-dispatched query answered twice: exactly one result per input
                continue
            results[str(idx)] = {
                "input": job.inputs[idx][0],
                "model": job.model,
                "top5": top5,
                "error": error,
                "worker": m.node_id,
                "batch": len(task.indexes) if task is not None else len(m.results),
                "completed_at": completed_at,
                "dispatches": job.dispatches.get(idx, 1),
            }
        # A batch cannot have computed for longer than it has been out: the worker's figure feeds
        # the task timeouts (and the standby's copy of them), so it is held to what we saw.
        elapsed = min(m.elapsed, max(0.0, self.clock() - task.dispatched)) if task is not None else m.elapsed
        dispatched = task.dispatched if task is not None else self.clock() - elapsed
        latency = max(0.0, self.clock() - dispatched)
        for r in results.values():
            r["latency"] = latency
        n = len(results)
        self.busy_seconds[m.node_id] = self.busy_seconds.get(m.node_id, 0.0) + elapsed
        if n and elapsed > 0 and task is not None:
            per_image = elapsed / max(1, len(m.results))
            old = self.cost.get(job.model)
            self.cost[job.model] = per_image if old is None else 0.8 * old + 0.2 * per_image
            if slot is not None:
                slot.cost = per_image if not slot.cost else 0.8 * slot.cost + 0.2 * per_image
                mine = slot.costs.get(job.model)
                slot.costs[job.model] = per_image if mine is None else 0.8 * mine + 0.2 * per_image
        self.emit(
            "task.result",
            {"task_id": m.task_id, "job_id": job.job_id, "results": results, "latency": latency,
             "elapsed": elapsed, "ts": completed_at, "worker": m.node_id, "duplicates": duplicates,
             "final": m.final},
            now,
        )
        self.dispatch(now)  # a slot is free, or the worker's queued work fell below the prefetch lead

    def _check_result(self, m: TaskResult, task: TaskInfo | None) -> tuple[Job, dict[int, Any]]:
        """A result must answer the task it names: its job, from its worker, for its queries, with a
        real duration. Raise ValueError otherwise. A task this coordinator does not hold (re-queued
        after a timeout, or dispatched by an earlier primary) may still answer its job's queries."""
        job = self.jobs.jobs.get(m.job_id)
        if job is None:
            raise ValueError(f"no job {m.job_id!r:.60}")
        if task is not None:
            if task.job_id != m.job_id:
                raise ValueError(f"the task belongs to {task.job_id}, not {m.job_id!r:.60}")
            if task.worker != m.node_id:
                raise ValueError(f"the task is held by {task.worker}")
        elif not m.task_id.endswith(f"-{job.job_id}"):
            raise ValueError(f"{m.task_id!r:.60} is not a task id of {job.job_id}")
        if not (math.isfinite(m.elapsed) and 0.0 <= m.elapsed <= MAX_ELAPSED):
            raise ValueError(f"elapsed {m.elapsed!r} is not a duration in [0, {MAX_ELAPSED:.0f}] s")
        return job, parse_answers(job, task, m.results)

    # ------------------------------------------------------------------------------------------
    # replicated state ops (run on primary and standby alike)

    def _op_job_add(self, d: dict[str, Any], now: float) -> None:
        job = Job.restore(d)
        self.jobs.add(job)

    def _op_job_start(self, d: dict[str, Any], now: float) -> None:
        for job_id in d["job_ids"]:
            job = self.jobs.jobs.get(job_id)
            if job is not None and job.state is JobState.QUEUED:
                job.state = JobState.RUNNING
                job.started = d["ts"]

    def _op_job_batch(self, d: dict[str, Any], now: float) -> None:
        job = self.jobs.jobs.get(d["job_id"])
        if job is not None:
            job.batch_size = int(d["batch_size"])
            job.latency_target = float(d.get("latency_target", 0.0))

    def _op_task_dispatch(self, d: dict[str, Any], now: float) -> None:
        job = self.jobs.jobs.get(d["job_id"])
        if job is None:
            return
        self.jobs.dispatch(job, d["task_id"], d["worker"], list(d["indexes"]), d["dispatched"],
                           now + self.cfg.task_timeout_min)
        if job.stats.started is None:
            job.stats.started = d["dispatched"]

    def _op_task_result(self, d: dict[str, Any], now: float) -> None:
        job = self.jobs.jobs.get(d["job_id"])
        if job is None:
            return
        task = self.jobs.tasks.get(d["task_id"])
        final = bool(d.get("final", True))
        if task is not None and task.job_id == job.job_id:  # never another job's task
            if final:
                del self.jobs.tasks[d["task_id"]]
        else:
            task = None
        fresh = self.jobs.record(job, {int(k): v for k, v in d["results"].items()}, task)
        # Results dropped here (not this task's queries any more) count as duplicates too.
        job.stats.duplicates += int(d.get("duplicates", 0)) + len(d["results"]) - len(fresh)
        if task is not None and final:
            # A result that does not answer every query of its task must not lose the rest.
            missing = [i for i in task.indexes if i not in job.results]
            if missing and job.state is not JobState.CANCELLED:
                job.pending.extendleft(reversed(missing))
            self._refund(task.task_id, job, len(missing))
        errors = sum(1 for r in fresh.values() if r.get("error"))
        if fresh:
            job.stats.record(len(fresh), errors, d["latency"], d["elapsed"], d["ts"], d.get("worker", ""))
        self._finish_if_done(job, d["ts"])

    def _finish_if_done(self, job: Job, ts: float) -> None:
        """The one place a job is declared finished: timeline event, and the primary writes its results."""
        if self.jobs.maybe_finish(job, ts):
            log.info("job %s finished: %d results", job.job_id, len(job.results))
            self.scheduler.forget(job.job_id)
            self.events.append({"ts": ts, "kind": "job_done", "detail": job.job_id})
            if self.role == PRIMARY:
                self.on_job_done(job)

    def _op_job_cancel(self, d: dict[str, Any], now: float) -> None:
        job = self.jobs.jobs.get(d["job_id"])
        if job is None or job.state in (JobState.DONE, JobState.CANCELLED):
            return
        self.jobs.cancel(job, d["ts"])
        self.scheduler.forget(job.job_id)
        self._finish_if_done(job, d["ts"])  # nothing in flight: finished at once

    def _op_task_requeue(self, d: dict[str, Any], now: float) -> None:
        task = self.jobs.tasks.get(d["task_id"])
        if task is not None and (slot := self.slots.get(task.worker)) is not None:
            # Re-queued (timeout, failed send): it no longer holds a slot, or a lost Task would
            # hold it forever.
            slot.outstanding.pop(task.task_id, None)
        job = self.jobs.jobs.get(task.job_id) if task is not None else None
        before = len(job.pending) if job is not None else 0
        self.jobs.requeue(d["task_id"])
        if job is not None:
            self._refund(d["task_id"], job, len(job.pending) - before)
            self._finish_if_done(job, self.clock())  # a cancelled job's last task was lost: it is over

    def _refund(self, task_id: str, job: Job, requeued: int) -> None:
        """The job was charged when these queries went out; charging their re-dispatch again would
        hand its share to the other jobs after every worker failure. Only what this coordinator
        charged is refunded (a standby charged nothing; a new primary did not charge restored tasks)."""
        charged = self.charged.pop(task_id, 0)
        if charged and requeued > 0:
            self.scheduler.refund(job.job_id, min(charged, requeued), job.weight)

    def _op_job_results_written(self, d: dict[str, Any], now: float) -> None:
        job = self.jobs.jobs.get(d["job_id"])
        if job is not None and job.results_version is None:  # the first recorded write is the one
            job.results_version = int(d["version"])

    def results_written(self, job_id: str, version: int, now: float) -> bool:
        """The result writer put ``results/<job_id>`` as ``version``: record it (primary only).

        False if it cannot be recorded (not primary any more, or a write is already recorded):
        that SDFS version then stays as an unrecorded rewrite of the same content.
        """
        job = self.jobs.jobs.get(job_id)
        if self.role != PRIMARY or job is None or job.results_version is not None:
            return False
        self.emit("job.results_written", {"job_id": job_id, "version": version}, now)
        self.commit()
        return True

    def write_missing_results(self) -> list[str]:
        """Hand every finished job whose results file is not recorded as written to the writer
        (a new primary after a promotion or a restart owes them; the writer skips duplicates)."""
        owed = [j for j in self.jobs.jobs.values() if j.finished is not None and j.results_version is None]
        for job in owed:
            self.on_job_done(job)
        return [j.job_id for j in owed]

    def _op_member(self, d: dict[str, Any], now: float) -> None:
        self.registry.apply(d["event"], d["member"], d["seq"], d["epoch"], now)

    def _op_sdfs_files(self, d: dict[str, Any], now: float) -> None:
        self.master.apply_entries(d["entries"])

    def _op_event(self, d: dict[str, Any], now: float) -> None:
        self.events.append(d)
        del self.events[:-1000]

    # ------------------------------------------------------------------------------------------
    # standby replication

    def _task_records(self) -> list[dict[str, Any]]:
        return [
            {"task_id": t.task_id, "job_id": t.job_id, "worker": t.worker, "indexes": t.indexes,
             "dispatched": t.dispatched}
            for t in self.jobs.tasks.values()
        ]

    def snapshot(self) -> dict[str, Any]:
        return {
            "members": self.registry.view(),
            "view_seq": self.registry.seq,
            "epoch": self.registry.epoch,
            "sdfs": self.master.snapshot(),
            "jobs": [j.snapshot() for j in self.jobs.jobs.values()],
            "tasks": self._task_records(),
            "events": self.events[-1000:],
            "cost": self.cost,
        }

    def durable_items(self) -> list[tuple[str, Any]]:
        """The state for a compacted snapshot in the state store, one item per job (so no item is
        the whole state), without SDFS: the master keeps its own SQLite. Built fresh (the store
        packs it on another thread while the loop goes on)."""
        items: list[tuple[str, Any]] = [
            ("members", {"members": self.registry.view(), "view_seq": self.registry.seq,
                         "epoch": self.registry.epoch}),
            ("cost", dict(self.cost)),
            ("events", list(self.events[-1000:])),
        ]
        cache: dict[str, tuple[Any, dict[str, Any]]] = {}
        for j in self.jobs.jobs.values():
            # A finished job does not change (but for a late duplicate or its results file): its
            # item is built once, not again at every compaction while the loop waits.
            key = j.durable_key()
            hit = self._durable_cache.get(j.job_id)
            item = hit[1] if key is not None and hit is not None and hit[0] == key else j.durable()
            if key is not None:
                cache[j.job_id] = (key, item)
            items.append(("job", item))
        self._durable_cache = cache
        items.append(("tasks", self._task_records()))
        return items

    def _restore_jobs(self, state: dict[str, Any], now: float) -> None:
        self.registry.restore(state["members"], state["view_seq"], state["epoch"], now)
        self.jobs = JobTable()
        for jd in state["jobs"]:
            self.jobs.add(Job.restore(jd))
        for t in state["tasks"]:
            self._op_task_dispatch(t, now)
        for jd in state["jobs"]:  # replaying the in-flight tasks above counted their dispatch a second time
            self.jobs.jobs[jd["job_id"]].dispatches = {int(k): int(v) for k, v in (jd.get("dispatches") or {}).items()}
        self.events = list(state.get("events", []))
        self.cost = dict(state.get("cost", {}))

    def restore(self, state: dict[str, Any], seq: int, term: int, now: float) -> None:
        """Install the primary's snapshot (standby). The state store starts a new history from it."""
        self._restore_jobs(state, now)
        if "sdfs" in state:  # absent when the snapshot transfer already applied the SDFS entries
            self.master.restore(state["sdfs"])  # tombstones and indexes need the full reset
        self.state_seq = seq
        self.term = max(self.term, term)
        if self.store is not None:
            # Our journal may be another history with the same seq numbers (a demoted primary):
            # ops from here on belong to the new one, which becomes the restorable state once the
            # snapshot below is on disk (until then a restart finds the old, consistent one).
            self.store.new_lineage(seq)
            self.store.compact(seq, self.term, self.durable_items())

    def load_state(self, now: float) -> dict[str, int]:
        """Start-up: the state store's snapshot and journal tail, then the recovery of what was in
        flight (re-queued: those queries run again; a late answer still counts once). Before serving."""
        if self.store is None:
            return {"jobs": 0, "ops": 0, "requeued": 0}
        loaded = self.store.load()
        state: dict[str, Any] = {"members": [], "view_seq": 0, "epoch": 0, "jobs": [], "tasks": []}
        for kind, value in loaded.items:
            if kind == "members":
                state.update(value)
            elif kind == "job":
                state["jobs"].append(value)
            elif kind in ("tasks", "events", "cost"):
                state[kind] = value
        try:
            self._restore_jobs(state, now)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("coordinator state snapshot unusable (%s): starting from its journal only", exc)
            self.jobs = JobTable()
        ops = 0
        for seq, _term, op, data in self.store.journal_ops(loaded.seq, loaded):
            try:
                self.apply_op(op, data, now)
            except Exception as exc:  # one bad op must not keep the coordinator from starting
                loaded.skipped += 1
                log.warning("stored op %d (%s) could not be applied: %s; skipped", seq, op, exc)
            ops += 1
        self.state_seq = loaded.last_seq
        self.term = max(self.term, loaded.term)
        self.recovering = True
        try:
            in_flight = list(self.jobs.tasks)
            for task_id in in_flight:
                self.emit("task.requeue", {"task_id": task_id}, now)
        finally:
            self.recovering = False
        self.commit()
        if self.jobs.jobs or ops:
            log.info("restored %d jobs from the state store (%d journal ops after the snapshot at seq %d, "
                     "%d in-flight tasks re-queued, %d unreadable entries skipped); state seq %d, term %d",
                     len(self.jobs.jobs), ops, loaded.seq, len(in_flight), loaded.skipped, self.state_seq, self.term)
        return {"jobs": len(self.jobs.jobs), "ops": ops, "requeued": len(in_flight), "skipped": loaded.skipped}

    def maybe_compact(self) -> bool:
        """Compact the state store when its journal has grown past the threshold (loop thread)."""
        if self.store is None or not self.store.should_compact():
            return False
        self.store.compact(self.state_seq, self.term, self.durable_items())
        return True

    def on_state_request(self, ident: bytes, m: StateRequest, now: float) -> None:
        """Start a chunked transfer of the state at the current seq (see broker/snapshot.py)."""
        if self.role != PRIMARY:
            self.reply_error(ident, m.req, ErrorCode.NOT_PRIMARY, f"{self.addr} is {self.role}")
            return
        t0 = time.perf_counter()
        old = self.transfers.pop(ident, None)  # a new request supersedes this standby's earlier transfer
        if old is not None:
            old.close()
        while len(self.transfers) >= MAX_TRANSFERS:
            self.transfers.pop(min(self.transfers, key=lambda k: self.transfers[k].last_used)).close()
        # Frozen at S: what is not an idempotent whole-entry record (shallow copies of containers).
        # SDFS entries are read when their chunk is produced (only the names are taken now).
        head = {
            "members": self.registry.view(),
            "view_seq": self.registry.seq,
            "epoch": self.registry.epoch,
            "tasks": [
                {"task_id": t.task_id, "job_id": t.job_id, "worker": t.worker, "indexes": list(t.indexes),
                 "dispatched": t.dispatched}
                for t in self.jobs.tasks.values()
            ],
            "events": self.events[-1000:],
            "cost": dict(self.cost),
        }
        jobs = [j.snapshot() for j in self.jobs.jobs.values()]
        names = list(self.master.files.keys() | self.master.next_version.keys() | self.master.tombs.keys())
        self.transfers[ident] = SnapshotSource(m.req, self.state_seq, self.term, head, jobs, names, self.master,
                                               self.cfg.chunk_bytes, self.cfg.transfer_window + 2, now)
        log.info("snapshot transfer %d for %r: state seq %d, %d jobs, %d files (frozen in %.0f ms)",
                 m.req, ident[:40], self.state_seq, len(jobs), len(names), (time.perf_counter() - t0) * 1000)

    def on_state_fetch(self, ident: bytes, m: StateFetch, now: float) -> None:
        src = self.transfers.get(ident)
        if self.role != PRIMARY:
            self.reply_error(ident, m.req, ErrorCode.NOT_PRIMARY, f"{self.addr} is {self.role}")
            return
        if src is None or src.req != m.req:
            self.reply_error(ident, m.req, ErrorCode.NOT_FOUND, f"no snapshot transfer {m.req} here: request a new one")
            return
        try:
            out = src.fetch(m.index, m.have, now)
        except LookupError as exc:
            self.reply_error(ident, m.req, ErrorCode.NOT_FOUND, str(exc))
            return
        if out is not None:
            self._send_chunk(ident, src, m.index, *out)
        # else: produced off the loop; sent by _serve_transfers when ready

    def _send_chunk(self, ident: bytes, src: SnapshotSource, index: int, data: bytes, last: bool) -> None:
        self.net.send(ident, StateChunk(src.req, index, data, last))
        if last:
            log.info("snapshot transfer %d sent: %d chunks, %.1f MB in %.2fs", src.req, index + 1, src.bytes / 1e6,
                     time.monotonic() - src.started)

    def _serve_transfers(self, now: float) -> None:
        """Send chunks that were fetched before the producer thread had them; drop finished transfers."""
        for ident, src in list(self.transfers.items()):
            for index, data, last in src.ready():
                self._send_chunk(ident, src, index, data, last)
            if src.error and src.waiting:
                self.reply_error(ident, src.req, ErrorCode.INTERNAL, src.error)
                src.waiting.clear()
            if src.done:
                src.close()
                del self.transfers[ident]

    def _expire_transfers(self, now: float) -> None:
        """A transfer nobody fetched from for a while is abandoned (the standby died or started over)."""
        idle = max(60.0, 4 * self.cfg.request_timeout)
        for ident in [k for k, t in self.transfers.items() if now - t.last_used > idle]:
            self.transfers.pop(ident).close()

    def promote(self, now: float) -> None:
        """Standby -> primary: new term, fresh failure-detector grace, unfinished work re-planned."""
        self.term += 1  # persisted by the setter before any message carries it
        self.take_over(now)
        log.warning("promoted to primary with term %d", self.term)
        self.event("failover", f"{self.addr} primary (term {self.term})", now)

    def take_over(self, now: float) -> None:
        """Become the primary of the state we hold (after a promotion, or at start-up with restored
        state): members get a fresh grace to re-attach, and finished jobs whose results file is not
        recorded as written are written now."""
        self.role = PRIMARY
        self.registry.touch_all(now)
        for task in self.jobs.tasks.values():
            task.deadline = now + self.cfg.task_timeout_min
        self.slots = {}  # until each worker re-attaches and announces its credit
        self.charged = {}  # restored tasks were charged by the old primary, not by us
        self.next_repair = now + self.cfg.failure_timeout
        self.next_heartbeat = now  # announce the new term at once: workers switch on hearing it
        self.write_missing_results()

    def demote(self) -> None:
        log.warning("another coordinator has a higher term; becoming standby")
        self.role = STANDBY
        for src in self.transfers.values():
            src.close()
        self.transfers.clear()

    # ------------------------------------------------------------------------------------------
    # commands

    def on_command(self, ident: bytes, m: Command, now: float) -> None:
        fn = self.commands.get(m.name)
        if fn is None:
            self.reply_error(ident, m.req, ErrorCode.BAD_REQUEST,
                             f"unknown command {m.name!r}; commands: {', '.join(sorted(COMMANDS))}")
            return
        try:
            data = fn(check_args(m.name, dict(m.args)), now)  # every argument's type and range, here
        except CommandError as exc:
            self.reply_error(ident, m.req, exc.code, str(exc))
            return
        except (KeyError, TypeError, ValueError) as exc:
            self.reply_error(ident, m.req, ErrorCode.BAD_REQUEST,
                             f"bad arguments for {m.name}: {exc}; usage: {COMMANDS[m.name].usage()}")
            return
        # Whatever a client is told (a job submitted, a count of results) is durable first: a
        # restart never goes back behind an answer. Cheap: the loop commits once per iteration
        # anyway, this only moves that commit before the reply.
        self.commit()
        self.net.send(ident, Ok(m.req, data))

    def _job(self, args: dict[str, Any]) -> Job:
        job_id = args.get("job")
        if not isinstance(job_id, str) or job_id not in self.jobs.jobs:
            known = ", ".join(self.jobs.jobs) or "none"
            raise CommandError(ErrorCode.NOT_FOUND, f"no such job {job_id!r} (jobs: {known})")
        return self.jobs.jobs[job_id]

    def _jobs(self, args: dict[str, Any]) -> list[Job]:
        return [self._job(args)] if args.get("job") else list(self.jobs.jobs.values())

    def cmd_info(self, args: dict[str, Any], now: float) -> Any:
        return {"sdfs": self.master.info(), "members": len(self.registry.alive()), "term": self.term,
                "role": self.role, "failures_detected": self.failures_detected, "dropped": dict(self.dropped),
                "loop_stall_max": round(self.max_stall, 3), "heartbeat_gap_max": round(self.registry.max_gap(), 3),
                "slowest_message": {"type": self.slowest[0], "seconds": round(self.slowest[1], 4)},
                "state_store": self.store.info() if self.store is not None else None}

    def cmd_pending(self, args: dict[str, Any], now: float) -> Any:
        return {
            j.job_id: {
                "pending": [j.qid(i) for i in list(j.pending)[:200]],
                "pending_count": len(j.pending),
                "in_flight": sum(len(t.indexes) for t in self.jobs.tasks.values() if t.job_id == j.job_id),
                "state": str(j.state),
            }
            for j in self._jobs(args)
        }

    def cmd_completed(self, args: dict[str, Any], now: float) -> Any:
        return {
            j.job_id: {"completed": len(j.results), "total": j.total, "errors": j.stats.errors,
                       "model": j.model, "state": str(j.state)}
            for j in self._jobs(args)
        }

    def cmd_start(self, args: dict[str, Any], now: float) -> Any:
        queued = [j.job_id for j in self.jobs.jobs.values() if j.state is JobState.QUEUED]
        if queued:
            self.emit("job.start", {"job_ids": queued, "ts": self.clock()}, now)
            for job_id in queued:
                self.event("job_started", job_id, now)
        self.dispatch(now)
        return {"started": queued}

    def cmd_submit(self, args: dict[str, Any], now: float) -> Any:
        model = args.get("model")
        pattern = args.get("inputs")
        if not isinstance(model, str) or not model.strip():
            raise CommandError(ErrorCode.BAD_REQUEST, "submit needs a model name")
        try:  # now, not when every query fails at the workers
            model = resolve_model(model, self.models)
        except ValueError as exc:
            raise CommandError(ErrorCode.BAD_REQUEST, str(exc)) from None
        if not isinstance(pattern, str) or not pattern:
            raise CommandError(ErrorCode.BAD_REQUEST, "submit needs an SDFS glob or prefix of inputs")
        request_id = args.get("request_id") or ""
        if len(request_id) > 64:
            raise CommandError(ErrorCode.BAD_REQUEST, "request_id must be at most 64 characters")
        if request_id in self.jobs.by_request:
            # A retry of a submit that was done (its reply was lost or late, or went to the old
            # primary): the same job, not a second one.
            return self.jobs.jobs[self.jobs.by_request[request_id]].describe()
        # Defaults only for what was not given: 0 is an error, not "use the default".
        batch, target = self._batch_args(args.get("batch"), args.get("latency_target"))
        weight = args.get("weight")
        weight = 1.0 if weight is None else weight
        files = self.master.ls(pattern)
        inputs = [(f["name"], f["versions"][0]["version"]) for f in files if f["versions"]]
        inputs = [i for i in inputs if not i[0].startswith("results/")]
        if not inputs:
            raise CommandError(ErrorCode.NOT_FOUND, f"no input files match {pattern!r} in SDFS; `put` them first")
        weights = args.get("weights") or ""
        if weights:
            try:  # a pinned checkpoint must exist now, not fail every query at the workers
                self.master.locate(weights, 1)
            except MasterError as exc:
                raise CommandError(exc.code, f"--weights: {exc}") from None
        job_id = self.jobs.new_job_id(model)
        job = Job(job_id, model, inputs, batch, weight, weights=weights, submitted=self.clock(),
                  latency_target=target, request_id=request_id)
        self.emit("job.add", job.snapshot(), now)
        self.preload(job)
        self.event("job_added", job_id, now)
        if args.get("start") or self.jobs.running():
            self.emit("job.start", {"job_ids": [job_id], "ts": self.clock()}, now)
            self.event("job_started", job_id, now)
            self.dispatch(now)
        return self.jobs.jobs[job_id].describe()

    def preload(self, job: Job) -> None:
        """Warm start: every live worker loads the job's model now, before its first batch (docs/models.md)."""
        if self.role == PRIMARY and job.model != NOOP:
            for m in self.registry.alive("worker"):
                self.net.send(m.node_id.encode(), Preload(job.model, job.weights))

    def cmd_jobs(self, args: dict[str, Any], now: float) -> Any:
        return [j.describe() for j in self.jobs.jobs.values()]

    def _rate(self, job: Job, window: float | None = None) -> float:
        return job.stats.rate(self.clock(), window or self.cfg.rate_window)

    def cmd_query_rate(self, args: dict[str, Any], now: float) -> Any:
        jobs = self._jobs(args)
        short, long = self.cfg.rate_window, self.cfg.rate_window_long
        rates = {j.job_id: {"rate": self._rate(j), "count": len(j.results), "window": short,
                            "rate_long": self._rate(j, long), "window_long": long,
                            "model": j.model, "overall": j.stats.overall_rate(), "state": str(j.state),
                            "duplicates": j.stats.duplicates}
                 for j in jobs}
        running = [j.job_id for j in jobs if j.state is JobState.RUNNING]
        return {"jobs": rates, "gap": rate_gap([rates[j]["rate"] for j in running]),
                "gap_long": rate_gap([rates[j]["rate_long"] for j in running])}

    def cmd_query_time(self, args: dict[str, Any], now: float) -> Any:
        return {
            j.job_id: {"latency": summarize(j.stats.latencies), "compute": summarize(j.stats.compute),
                       "model": j.model}
            for j in self._jobs(args)
        }

    def _batch_args(self, batch: Any, target: float | None) -> tuple[int, float]:
        """(batch size, latency target) from a command's arguments; batch size 0 means auto."""
        batch = self.cfg.default_batch_size if batch is None else batch
        if batch == AUTO:
            return 0, target or self.cfg.default_latency_target
        if target:
            raise CommandError(ErrorCode.BAD_REQUEST, "--latency-target goes with --batch auto")
        if not 1 <= batch <= self.cfg.max_batch_size:
            raise CommandError(ErrorCode.BAD_REQUEST, f"batch size must be 1..{self.cfg.max_batch_size} or auto")
        return batch, 0.0

    def cmd_set_batch_size(self, args: dict[str, Any], now: float) -> Any:
        job = self._job(args)
        n, target = self._batch_args(args["n"], args.get("latency_target"))
        self.emit("job.batch", {"job_id": job.job_id, "batch_size": n, "latency_target": target}, now)
        return job.describe()

    def cmd_results(self, args: dict[str, Any], now: float) -> Any:
        job = self._job(args)
        limit = int(args.get("limit") or 0)
        after = args.get("after")
        if after is None:  # by query index
            items = [job.results[i] | {"qid": job.qid(i)} for i in sorted(job.results)]
            items = items[:limit] if limit > 0 else items
            return {"job": job.describe(), "results": items, "sdfs_name": f"results/{job.job_id}"}
        # In completion order from a cursor: results are only ever appended, on the standby in the
        # same order, so a client resumes with ``next`` after a failover without gaps or repeats.
        after = max(0, int(after))
        end = len(job.results) if limit <= 0 else min(len(job.results), after + limit)
        keys = list(itertools.islice(job.results, after, end))
        items = [job.results[i] | {"qid": job.qid(i)} for i in keys]
        return {"job": job.describe(), "results": items, "sdfs_name": f"results/{job.job_id}",
                "next": after + len(items), "in_flight": self.jobs.in_flight(job.job_id)}

    def cmd_cancel(self, args: dict[str, Any], now: float) -> Any:
        job = self._job(args)
        dropped = len(job.pending) if job.state in (JobState.QUEUED, JobState.RUNNING) else 0
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            self.emit("job.cancel", {"job_id": job.job_id, "ts": self.clock()}, now)
            self.event("job_cancelled", job.job_id, now)
        return job.describe() | {"dropped": dropped, "in_flight": self.jobs.in_flight(job.job_id)}

    def cmd_vm_info(self, args: dict[str, Any], now: float) -> Any:
        out = {}
        for m in self.registry.alive("worker"):
            slot = self.slots.get(m.node_id, WorkerSlot())
            out[m.node_id] = {
                "models": list(slot.models),
                "credit": slot.credit,
                "cost_per_image": slot.cost,
                "tasks": [
                    {"task_id": t.task_id, "job": t.job_id, "queries": [f"{t.job_id}:{i}" for i in t.indexes]}
                    for t in self.jobs.tasks_of(m.node_id)
                ],
            }
        return out

    def cmd_members(self, args: dict[str, Any], now: float) -> Any:
        return {"epoch": self.registry.epoch, "seq": self.registry.seq, "members": self.registry.view(),
                "coordinator": {"addr": self.addr, "role": self.role, "term": self.term, "state_seq": self.state_seq,
                                "synced": self.role == PRIMARY or self.synced}}

    def cmd_timeline(self, args: dict[str, Any], now: float) -> Any:
        return {
            "jobs": {
                j.job_id: {
                    "model": j.model,
                    "rates": j.stats.series(self.cfg.rate_window),
                    "latencies": j.stats.recent_latencies(),
                    "spans": [[sp.worker, sp.start, sp.end, sp.n] for sp in j.stats.spans],
                }
                for j in self._jobs(args)
            },
            "events": self.events[-1000:],
            "window": self.cfg.rate_window,
        }

    def metrics_snapshot(self, now: float) -> dict[str, Any]:
        """Plain data for the Prometheus collector, built on the loop thread (no shared mutable state)."""
        return {
            "rates": self.cmd_query_rate({}, now)["jobs"],
            "jobs": {
                j.job_id: {
                    "model": j.model,
                    "completed": len(j.results),
                    "errors": j.stats.errors,
                    "pending": len(j.pending),
                    "in_flight": sum(len(t.indexes) for t in self.jobs.tasks.values() if t.job_id == j.job_id),
                    "batch_size": j.batch_size,
                    "duplicates": j.stats.duplicates,
                    "latency": j.stats.latencies.to_dict(),  # constant size; the collector reads it
                }
                for j in self.jobs.jobs.values()
            },
            "members": [m.public() for m in self.registry.members.values()],
            "busy_seconds": dict(self.busy_seconds),
            "failures_detected": self.failures_detected,
            "loop_stall_max": self.max_stall,
            "slowest_message": self.slowest,
            "heartbeat_gap_max": self.registry.max_gap(),
            "dropped": dict(self.dropped),
            "sdfs": self.master.info(),
            "role": self.role,
            "term": self.term,
        }

    def cmd_status(self, args: dict[str, Any], now: float) -> Any:
        return {
            "members": self.cmd_members({}, now),
            "jobs": self.cmd_jobs({}, now),
            "rates": self.cmd_query_rate({}, now),
            "times": self.cmd_query_time({}, now),
            "vm_info": self.cmd_vm_info({}, now),
            "sdfs": self.master.info(),
            "events": self.events[-200:],
            "cost": self.cost,
        }
