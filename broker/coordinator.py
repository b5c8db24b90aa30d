"""The coordinator, free of sockets: a facade over its named parts.

``handle(identity, msg, now)`` processes one decoded message and ``tick(now)`` runs the timers;
everything leaves through ``self.net`` (``send`` to a ROUTER peer, ``publish`` on PUB). The socket
loop lives in :mod:`broker.server`; unit tests drive this class with an in-memory ``Net``.

The parts (docs/architecture.md):

- :class:`broker.state.ReplicatedState` -- the only thing state ops change (jobs, tasks, scheduler
  accounting, costs, timeline); snapshot and restore are derived from it;
- :class:`broker.journal.Journal` -- the sequenced op stream, the state store, start-up recovery;
- :class:`broker.dispatch.Dispatcher` -- worker sessions (credit, deadlines) and dispatch, results;
- :class:`broker.members.Membership` and :class:`broker.files.Files` -- membership and SDFS requests;
- :class:`broker.views.Views` (read-only commands) and :class:`broker.control.Control` (the rest);
- :class:`broker.transfer.Transfers` -- serving the state to a standby.

This class checks who sent what, routes each message type to its part, runs the timers, and holds
the role and term (promotion, take-over, demotion).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol

from broker.control import Control
from broker.dispatch import Dispatcher, WorkerSlot
from broker.files import Files
from broker.jobs import Job, JobTable
from broker.journal import Journal
from broker.members import Membership
from broker.senders import SENDER_ROLES, refusal
from broker.state import ReplicatedState
from broker.state_store import StateStore
from broker.transfer import Transfers
from broker.views import CommandError, Views
from common.config import Config
from common.failure_detector import LOCAL_STALL
from common.membership import MemberRegistry
from common.modelnames import MODEL_NAMES
from common.protocol import (
    Bundle,
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
    Message,
    Pulse,
    PutBegin,
    PutCommit,
    PutReplace,
    Ready,
    ReportBad,
    StateFetch,
    StateRequest,
    Stored,
    TaskResult,
    Topic,
    ViewRequest,
)
from common.security import WORKER
from sdfs.master import SdfsMaster

__all__ = ["PRIMARY", "PROBING", "STANDBY", "SENDER_ROLES", "CommandError", "Coordinator", "Net", "WorkerSlot"]

log = logging.getLogger("idunno.coordinator")

# The scans over every member and task (failure detection, task timeouts, stale slots) run at most
# this often, not on every message: each is O(workers), and tick runs after every message.
SCAN_INTERVAL = 0.02
SLOW_MESSAGE = 0.1  # handling one message should never hold the loop longer than this (seconds)

PRIMARY, STANDBY, PROBING = "primary", "standby", "probing"

class Net(Protocol):
    def send(self, identity: bytes, msg: Message) -> bool: ...
    def publish(self, topic: bytes, msg: Message) -> None: ...


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
        self.persist_term = persist_term or (lambda term: None)
        self._term = self._persisted_term = term  # the caller loaded it from where it persists it
        self.clock = clock  # wall clock for statistics (replicated to the standby); timers use `now`
        self.models = frozenset(models)  # what `submit` accepts (torchvision classifiers and noop)
        self.addr = addr
        self.net = net
        self.role = role
        self.on_job_done = on_job_done or (lambda job: None)
        self.registry = MemberRegistry(cfg.detector_params())
        self.master = SdfsMaster(cfg, self.storage_nodes, db_path, journal=self.journal)
        self.dispatcher = Dispatcher(self)
        self.state = ReplicatedState(cfg, self.registry, self.master, clock, scheduler,
                                     on_finished=self._job_finished, on_task_gone=self.dispatcher.task_gone)
        self.log = Journal(self, store)
        self.membership = Membership(self)
        self.files = Files(self)
        self.views = Views(self)
        self.control = Control(self, self.views)
        self.transfer = Transfers(self)
        self.next_scan = 0.0
        self.next_heartbeat = 0.0
        self.dropped: dict[str, int] = {}  # messages refused, by reason (`info`, metrics)
        self._drop_logged: dict[str, float] = {}
        self.last_vote = -1e9  # last time a worker asked this (non-primary) coordinator for service
        self.max_stall = 0.0  # longest gap between two iterations of the socket loop (metric)
        self.slowest: tuple[str, float] = ("", 0.0)  # the message type that took longest to handle, and how long
        self.synced = False  # standby: holds the primary's snapshot and follows its updates (set by the server)
        self.handlers = self._handlers()

    def _handlers(self) -> dict[type[Message], Callable[[bytes, Any, float], None]]:
        ms, fs, d, t = self.membership, self.files, self.dispatcher, self.transfer
        return {
            Join: ms.on_join, Heartbeat: ms.on_heartbeat, Pulse: ms.on_pulse, Leave: ms.on_leave,
            ViewRequest: ms.on_view_request,
            PutBegin: fs.on_put_begin, PutCommit: fs.on_put_commit, PutReplace: fs.on_put_replace,
            Locate: fs.on_locate, Delete: fs.on_delete, ListFiles: fs.on_ls, ReportBad: fs.on_report_bad,
            Stored: fs.on_stored,
            Ready: d.on_ready, TaskResult: d.on_result, Bundle: d.on_bundle,  # (Bundle's: with the role too)
            Command: self.control.on_command,
            StateRequest: t.on_state_request, StateFetch: t.on_state_fetch,
        }

    # ------------------------------------------------------------------------------------------
    # the parts' shared surface (and the names server.py and the tests use)

    @property
    def is_primary(self) -> bool:
        return self.role == PRIMARY

    @property
    def jobs(self) -> JobTable:
        return self.state.jobs

    @property
    def slots(self) -> dict[str, WorkerSlot]:
        return self.dispatcher.slots

    @property
    def cost(self) -> dict[str, float]:
        """Seconds per image, per model, over the cluster (derived from the cost table)."""
        return self.state.costs.per_model()

    @property
    def transfers(self) -> dict[bytes, Any]:  # snapshot transfers being served, by standby
        return self.transfer.transfers

    @property
    def store(self) -> StateStore | None:
        return self.log.store

    @store.setter
    def store(self, value: StateStore | None) -> None:
        self.log.store = value

    @property
    def state_seq(self) -> int:
        return self.log.state_seq

    @state_seq.setter
    def state_seq(self, value: int) -> None:
        self.log.state_seq = value

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

    def storage_nodes(self) -> dict[str, str]:
        return {m.node_id: m.data_addr for m in self.registry.alive("worker") if m.data_addr}

    def reply_error(self, ident: bytes, req: int, code: str, message: str) -> None:
        self.net.send(ident, Error(req, code, message))

    def send_outbox(self, outbox: list[tuple[str, Message]]) -> None:
        for node_id, msg in outbox:
            self.net.send(node_id.encode(), msg)

    def journal(self, op: str, data: dict[str, Any]) -> None:
        self.log.journal(op, data)

    def emit(self, op: str, data: dict[str, Any], now: float) -> None:
        self.log.emit(op, data, now)

    def event(self, kind: str, detail: str, now: float) -> None:
        self.emit("event", {"ts": self.clock(), "kind": kind, "detail": detail}, now)

    def drop(self, reason: str, now: float, fmt: str, *args: Any) -> None:
        """Refuse a message: count it by reason, log at most a line per reason per second (no log flood)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if now - self._drop_logged.get(reason, -math.inf) >= 1.0:
            self._drop_logged[reason] = now
            log.warning(f"{fmt} ({reason}: %d dropped so far)", *args, self.dropped[reason])

    def _job_finished(self, job: Job, ts: float) -> None:
        if self.is_primary:
            self.on_job_done(job)  # the primary writes its results file

    # Entry points of the replicated state and its durability (server.py, the failover logic).
    def apply_op(self, op: str, data: dict[str, Any], now: float) -> None:
        self.state.apply_op(op, data, now)

    def apply_update(self, seq: int, term: int, op: str, data: dict[str, Any], now: float) -> None:
        self.log.apply_update(seq, term, op, data, now)

    def commit(self) -> None:
        self.log.commit()

    def snapshot(self) -> dict[str, Any]:
        return self.state.snapshot()

    def durable_items(self) -> list[tuple[str, Any]]:
        return self.log.durable_items()

    def restore(self, state: dict[str, Any], seq: int, term: int, now: float) -> None:
        self.log.restore(state, seq, term, now)

    def load_state(self, now: float) -> dict[str, int]:
        return self.log.load_state(now)

    def maybe_compact(self) -> bool:
        return self.log.maybe_compact()

    def dispatch(self, now: float) -> None:
        self.dispatcher.dispatch(now)

    def task_timeout(self, job: Job, worker: str, n: int | None = None) -> float:
        return self.dispatcher.sizer.task_timeout(job, worker, n)

    def metrics_snapshot(self, now: float) -> dict[str, Any]:
        return self.views.metrics_snapshot(now)

    def results_written(self, job_id: str, version: int, now: float) -> bool:
        return self.log.results_written(job_id, version, now)

    # ------------------------------------------------------------------------------------------
    # entry points of the socket loop

    def _refused(self, ident: bytes, msg: Message, now: float, sender_role: str | None) -> bool:
        slot = self.slots.get(ident.decode(errors="replace")) if sender_role is not None else None
        if slot is not None:
            slot.hijacked = sender_role != WORKER
        refused = refusal(ident, msg, sender_role)
        if refused is not None:
            self.drop(refused[0], now, "%s dropped", refused[1])
        return refused is not None

    def handle(self, ident: bytes, msg: Message, now: float, sender_role: str | None = None) -> None:
        """One message from ROUTER peer ``ident`` whose key has CURVE ``sender_role`` (None: plain mode)."""
        self.dispatcher.scan.touch(ident.decode(errors="replace"))  # whatever it says, look at it next pass
        handler = self.handlers.get(type(msg))
        if handler is None:
            req = getattr(msg, "req", 0)
            self.reply_error(ident, req, ErrorCode.BAD_REQUEST, f"{msg.TYPE} is not a coordinator request")
            return
        if self._refused(ident, msg, now, sender_role):
            return
        # A standby answers only questions about itself (`members` shows its role and term);
        # everything else goes to the primary, so a client never acts on a stale copy.
        standby_ok = isinstance(msg, (StateRequest, StateFetch, ViewRequest)) or (
            isinstance(msg, Command) and msg.name == "members"
        )
        if not self.is_primary and not standby_ok:
            self.on_not_primary(ident, msg, now)
            return
        try:
            handler(ident, msg, now, sender_role) if isinstance(msg, Bundle) else handler(ident, msg, now)
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
            self.net.publish(Topic.HEARTBEAT, CoordinatorHeartbeat(
                self.addr, self.role, self.term, self.registry.seq, self.state_seq))
        if self.transfers:
            self.transfer.serve(now)
        if not self.is_primary or not expire:
            return  # (a backlog of unread messages may hold heartbeats: read them before blaming anyone)
        if now >= self.next_scan or now < self.next_scan - SCAN_INTERVAL:  # (or the clock went back)
            self.next_scan = now + SCAN_INTERVAL
            self.membership.expire(now)
            self.dispatcher.expire(now)
        self.files.repair(now)
        self.dispatcher.dispatch(now)

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

    def next_deadline(self, now: float) -> float:
        deadlines = [self.next_heartbeat, self.files.next_repair if self.is_primary else now + 1.0]
        if self.transfer.waiting():
            deadlines.append(now + 0.005)  # a fetched chunk is being produced off the loop
        d = self.registry.next_deadline()
        if d is not None and self.is_primary:
            deadlines.append(d)
        return min(deadlines)

    # ------------------------------------------------------------------------------------------
    # role changes (the failover logic decides when)

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
        self.dispatcher.reset_sessions()  # until each worker re-attaches and announces its credit
        self.state.charged.clear()  # restored tasks were charged by the old primary, not by us
        self.files.next_repair = now + self.cfg.failure_timeout
        self.next_heartbeat = now  # announce the new term at once: workers switch on hearing it
        self.log.write_missing_results()

    def demote(self) -> None:
        log.warning("another coordinator has a higher term; becoming standby")
        self.role = STANDBY
        self.transfer.close_all()
