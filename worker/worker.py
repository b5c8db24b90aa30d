"""The worker daemon: membership, SDFS storage, and inference tasks from the primary coordinator.

One loop (``step``) owns every socket: a DEALER per coordinator (identity = node id), a SUB to
every coordinator's PUB, and an inproc PULL where the executor and the replication threads hand
back finished work. Heavy work never runs here, so heartbeats flow while torch computes.

Coordinator selection is the worker's failover machine (``common/failover.py``, WORKER_TABLE): the
worker follows the primary with the highest term it hears on PUB. When the primary is silent for
the failure timeout it asks every other coordinator for service (its Join is the standby's vote,
Binary Star) and re-attaches to whichever answers as primary, handing over the results it could not
deliver and the tasks it still holds.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from common.config import Config
from common.failover import Action, Event, PrimaryTracker, State, worker_machine
from common.failure_detector import LOCAL_STALL
from common.identity import default_node_name, make_node_id, new_incarnation, split_node_id, validate_node_name
from common.loop import run_until_stopped
from common.protocol import (
    Bundle,
    CoordinatorHeartbeat,
    Drop,
    Error,
    ErrorCode,
    Heartbeat,
    Join,
    Leave,
    Message,
    Preload,
    Ready,
    Rejoin,
    Replicate,
    ResultAck,
    Stored,
    Task,
    TaskResult,
    ViewRequest,
    ViewSnapshot,
    ViewUpdate,
    Welcome,
)
from common.transport import drain_published, try_decode
from sdfs.server import StorageServer
from sdfs.store import LocalStore
from worker.executor import MB, Executor
from worker.hostview import HostView
from worker.links import CoordinatorLinks
from worker.pulse import PulseSidecar
from worker.replicator import Replicator

log = logging.getLogger("idunno.worker")

BUNDLE_RESULTS = 32  # results in one Bundle at most (a batch's rows each: well under max_frame_bytes)


def keep_unacked(unacked: dict[str, TaskResult], piece: TaskResult) -> None:
    """Everything a task has answered so far, until the coordinator acknowledges its final piece:
    after a takeover the new primary gets it in one message (it de-duplicates by query)."""
    kept = unacked.get(piece.task_id)
    if kept is None:
        unacked[piece.task_id] = TaskResult(piece.task_id, piece.job_id, piece.node_id, piece.elapsed,
                                            list(piece.results), piece.final)
        return
    kept.results.extend(piece.results)
    kept.elapsed += piece.elapsed
    kept.final = piece.final


class TurnResults:
    """The results finished in one turn of the worker's loop (``step``), inline or by the executor:
    they leave together at its end, in one frame, a Bundle when there are several (issue #14: a
    frame per query cost more than the query). Outside a turn nothing is held."""

    def __init__(self) -> None:
        self.pending: list[TaskResult] | None = None

    def begin(self) -> None:
        if self.pending is None:  # (not None: a turn that failed half-way; its results go with this one's)
            self.pending = []

    def hold(self, msg: TaskResult) -> bool:
        if self.pending is None:
            return False
        self.pending.append(msg)
        return True

    def clear(self) -> None:
        if self.pending:
            self.pending.clear()

    def flush(self, send: Callable[[Message], Any]) -> None:
        """Send the turn's results (those unsent stay in the worker's ``unacked``, sent again on attach)."""
        out, self.pending = self.pending, None
        for i in range(0, len(out or ()), BUNDLE_RESULTS):
            chunk = out[i : i + BUNDLE_RESULTS]
            send(chunk[0] if len(chunk) == 1 else Bundle.of(chunk))


def rss_mb() -> tuple[int, int]:
    """This process's resident set now and at its peak, in MB (0 where the OS does not say): one
    small /proc read and one getrusage call, once per heartbeat."""
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // MB
    except (OSError, ValueError, IndexError):
        now = 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KB on Linux
    return now, max(now, peak)


def heartbeat(node_id: str, busy: int, executor: Executor) -> Heartbeat:
    """The worker's Heartbeat: liveness, tasks in hand, models loaded and memory (docs/protocol.md)."""
    now, peak = rss_mb()
    return Heartbeat(node_id, busy, list(executor.loaded), rss_mb=now, peak_rss_mb=peak,
                     budget_mb=executor.budget_bytes() // MB, model_mb=dict(executor.model_mb))


def join_msg(node_id: str, data_addr: str, store: LocalStore, held: list[str]) -> Join:
    """The worker's Join, with its replicas and the tasks it ``held``: still computing, or finished but
    not yet acknowledged. The coordinator keeps those out of the queue (their results follow the
    Welcome) instead of running them twice."""
    return Join(node_id, "worker", data_addr, store=[i.as_list() for i in store.list()],
                inflight=list(dict.fromkeys(held)))


def drain_sub(sub: zmq.Socket, max_frame: int, tracker: PrimaryTracker, hostview: HostView) -> None:
    """Read what the coordinators published: their heartbeats (whom to follow) and the view."""
    for msg in drain_published(sub, max_frame, "coordinator PUB", 1000):
        if isinstance(msg, CoordinatorHeartbeat):
            tracker.heard(msg.addr, msg.role, msg.term, time.monotonic())
        elif isinstance(msg, ViewUpdate):
            hostview.on_update(msg)


class Worker:
    def __init__(self, cfg: Config, data_dir: str | Path, port: int = 0, ctx: zmq.Context | None = None,
                 name: str | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.data_dir = Path(data_dir)
        self.store = LocalStore(self.data_dir / "sdfs")
        self.storage = StorageServer(cfg, self.store, self.ctx, port)
        # The name is the node's identity (and its data directory's); the incarnation is this start.
        self.name = validate_node_name(name) if name else default_node_name(cfg.host, self.storage.port)
        self.node_id = make_node_id(self.name)
        self.tracker = PrimaryTracker.of(list(cfg.coordinators), cfg.detector_params())
        self.fsm = worker_machine()
        self.last_tick = time.monotonic()
        self.generation = 0  # bumps on every new incarnation: older executor output is discarded
        self.links = CoordinatorLinks(self.ctx, cfg, self.node_id, list(self.tracker.coords))
        self.hostview = HostView()
        self.inflight: dict[str, Task] = {}
        self.unacked: dict[str, TaskResult] = {}
        self.held_reports: list[Stored] = []  # re-replication reports made while detached
        self.stale = 0  # tasks of an earlier incarnation the executor is still finishing
        self.turn = TurnResults()
        self.next_heartbeat = 0.0
        self.next_join = 0.0
        self.executor = Executor(
            cfg, lambda: self.node_id, self.store, self.data_dir / "cache", lambda: list(self.tracker.coords),
            self.links.inbox_endpoint, self.ctx,
            # Workers on this machine (by the membership view) share its memory for models.
            host_workers_fn=lambda: self.hostview.workers_on(self.storage.addr.rsplit(":", 1)[0]),
        )
        self.replicator = Replicator(cfg, list(self.tracker.coords), self.store, self.ctx, self.links.inbox_endpoint,
                                     lambda: self.node_id, lambda: self.generation)
        self.handlers: dict[type[Message], Callable] = {
            Rejoin: self.on_rejoin,
            Task: self.on_task,
            ResultAck: self.on_result_ack,
            Replicate: self.replicator.submit,
            Drop: self.on_drop,
            Error: self.on_error,
            ViewSnapshot: self.hostview.on_snapshot,
            Preload: self.on_preload,
            Bundle: self.on_bundle,
        }
        self.actions: dict[Action, Callable[[float, str | None, int], None]] = {
            Action.FOLLOW: self._follow,
            Action.UNFOLLOW: self._unfollow,
            Action.ADOPT_SENDER: self._adopt_sender,
            Action.LOG_JOINED: lambda _now, addr, term: log.info("joined coordinator %s (term %d)", addr, term),
            Action.ATTACH: self._attach,
            Action.NEW_INCARNATION: self._new_incarnation,
        }
        self.stop_event = threading.Event()
        self.pulse = PulseSidecar(cfg, self.data_dir / "pulse.mmap")

    # The coordinator followed (its term: self.tracker.term), and whether it welcomed us: the failover machine's.
    @property
    def primary(self) -> str | None:
        return self.tracker.primary

    @property
    def joined(self) -> bool:
        return self.fsm.state == State.ATTACHED

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        # Load torch before the first Join, on this thread: dlopen of libtorch holds the GIL for
        # seconds on a cold page cache, and done lazily in the compute thread it starved the loop,
        # so a freshly joined worker missed its heartbeats and was declared failed. torchvision and
        # the models (about as long again, but in short GIL slices) still load off the loop.
        # A torch-free worker (`torch = false`) serves only noop and never loads it at all.
        if self.cfg.torch:
            import torch  # noqa: F401, PLC0415

        self.storage.start()
        # The pulse sidecar (worker/pulse.py): liveness that GIL contention here cannot delay.
        self.pulse.start(self.node_id)
        self.executor.start()
        self.replicator.start()
        log.info("worker %s up (data %s), coordinators %s", self.node_id, self.storage.addr,
                 ", ".join(self.tracker.coords))

    def run(self) -> None:
        self.start()
        try:
            run_until_stopped(self.step, self.stop_event, log)
        finally:
            self.shutdown()

    def shutdown(self, leave: bool = True) -> None:
        if leave and self.joined:
            self.links.send(self.primary, Leave(self.node_id))
            time.sleep(0.05)  # shutdown path only: let the Leave reach the wire before LINGER=0 closes
        self.pulse.stop()
        self.executor.stop()
        self.replicator.stop()
        self.storage.stop()
        self.links.close()

    # -- loop -------------------------------------------------------------------------------------
    def step(self, now: float) -> None:
        timeout = max(0.0, min(self.next_heartbeat, self.next_join if not self.joined else 1e18) - now)
        self.turn.begin()
        for sock, _ in self.links.poll(int(min(timeout, 0.1) * 1000)):
            if sock is self.links.sub:
                drain_sub(self.links.sub, self.cfg.max_frame_bytes, self.tracker, self.hostview)
            elif sock is self.links.inbox:
                self._drain_inbox()
            elif not sock.closed:  # a Rejoin handled just now may have replaced the links
                self._drain_link(sock)
        self.turn.flush(lambda m: self.links.send(self.primary, m) if self.joined else None)
        self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        if now - self.last_tick > LOCAL_STALL:
            # This process was starved or frozen: the coordinators' heartbeats waiting in our socket
            # are not late, we are. Do not fail over because of our own stall.
            self.tracker.excuse(now - self.last_tick)
        self.last_tick = now
        self.pulse.tick(now)
        found = self.tracker.event(now)
        if found is not None:
            self.fire(found[0], now, found[1].addr, found[1].term)
        if not self.joined and now >= self.next_join:
            self.next_join = now + self.cfg.heartbeat_interval
            targets = [self.primary] if self.primary else list(self.tracker.coords)
            for addr in targets:
                self.links.send(addr, join_msg(self.node_id, self.storage.addr, self.store, [*self.inflight,
                                                                                             *self.unacked]))
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.cfg.heartbeat_interval
            if self.joined:
                self.links.send(self.primary, heartbeat(self.node_id, len(self.inflight), self.executor))
        if self.joined and (req := self.hostview.wanted()) is not None:
            self.links.send(self.primary, ViewRequest(req))

    def fire(self, event: Event, now: float, addr: str | None, term: int) -> None:
        """Move the failover machine by ``event`` (from coordinator ``addr`` of ``term``); run its actions."""
        for action in self.fsm.handle(event):
            self.actions[action](now, addr, term)

    def _drain_link(self, sock: zmq.Socket) -> None:
        for _ in range(256):
            try:
                frame = sock.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = try_decode(frame, self.cfg.max_frame_bytes, "coordinator")
            if msg is None:
                continue
            handler = self.handlers.get(type(msg))
            if handler is None and not isinstance(msg, Welcome):
                log.warning("unexpected %s from coordinator ignored", msg.TYPE)
                continue
            sender = self.links.addr_of(sock)
            if sender != self.primary and not isinstance(msg, (Welcome, Error)):
                # Only the primary we follow may command us: a resumed old primary (SIGSTOP, long GC
                # pause) must not make us rejoin, run its tasks or drop replicas.
                log.info("ignored %s from %s, which is not our primary", msg.TYPE, sender)
                continue
            try:
                if isinstance(msg, Welcome):
                    self.on_welcome(msg, sender)  # the one message whose sender matters: who welcomed us
                elif handler is not None:
                    handler(msg)
            except Exception:
                log.exception("handler for %s failed", msg.TYPE)
            if sock.closed:
                return

    def _drain_inbox(self) -> None:
        for _ in range(256):
            try:
                gen, frame = self.links.inbox.recv_multipart(flags=zmq.NOBLOCK)
            except (zmq.Again, ValueError):
                return
            msg = try_decode(frame, self.cfg.max_frame_bytes, "executor")
            if isinstance(msg, TaskResult):
                if msg.final:
                    self.inflight.pop(msg.task_id, None)
                if int(gen) != self.generation:
                    # Computed for an earlier incarnation (that member is dead): drop it, but tell the
                    # coordinator about the slot it freed, or this worker would stay below capacity.
                    if msg.final:
                        self.stale = max(0, self.stale - 1)
                        if self.joined:
                            self.links.send(self.primary, self._ready())
                    continue
                self._finished(msg)
            elif isinstance(msg, Stored):
                msg.node_id = self.node_id
                if self.joined:
                    self.links.send(self.primary, msg)
                else:
                    self.held_reports.append(msg)  # delivered once we are attached again

    def _finished(self, msg: TaskResult) -> None:
        """A piece of a task of this incarnation is done: keep it until acknowledged, send it (with the turn's)."""
        if msg.final:
            self.inflight.pop(msg.task_id, None)
        keep_unacked(self.unacked, msg)
        if not self.turn.hold(msg) and self.joined:
            self.links.send(self.primary, msg)

    # -- failover actions (WORKER_TABLE) -----------------------------------------------------------
    def _follow(self, now: float, addr: str | None, term: int) -> None:
        log.info("following primary coordinator %s (term %d)", addr, term)
        self.tracker.primary, self.tracker.term = addr, term
        self.next_join = now
        self.hostview.reset()

    def _unfollow(self, now: float, addr: str | None, term: int) -> None:
        log.warning("primary coordinator %s is silent; asking the others", self.primary)
        self.tracker.primary = None
        self.next_join = now

    def _adopt_sender(self, now: float, addr: str | None, term: int) -> None:
        # A Welcome is proof of life of a primary: follow it right away (after a takeover, or before
        # its first heartbeat reached our SUB) instead of waiting for a heartbeat.
        if addr is not None:
            self.tracker.heard(addr, "primary", term, time.monotonic())
            self.tracker.primary = addr

    def _attach(self, now: float, addr: str | None, term: int) -> None:
        self.tracker.term = term
        # Results no coordinator acknowledged yet (a takeover happened) go first, then the credit:
        # the coordinator de-duplicates by query, and Ready sets the credit absolutely afterwards.
        for r in self.unacked.values():
            self.links.send(self.primary, r)
        for report in self.held_reports:
            self.links.send(self.primary, report)
        self.held_reports.clear()
        self.links.send(self.primary, self._ready())

    def _new_incarnation(self, now: float, addr: str | None, term: int) -> None:
        self.node_id = make_node_id(self.name, new_incarnation(after=split_node_id(self.node_id)[1]))
        self.links.renew(self.node_id)
        self.pulse.set_node(self.node_id)
        self.generation += 1
        self.stale += len(self.inflight)  # still in the executor: they take slots until they finish
        self.inflight.clear()
        self.unacked.clear()
        self.turn.clear()  # the old incarnation's results: no coordinator takes them any more
        self.next_join = 0.0

    # -- handlers ---------------------------------------------------------------------------------
    def on_welcome(self, m: Welcome, sender: str | None) -> None:
        if sender is None or m.term < self.tracker.term:
            return  # an older term's primary: not followed
        self.fire(Event.WELCOME if m.node_id == self.node_id else Event.WELCOME_STALE, time.monotonic(),
                  sender, m.term)

    def _ready(self) -> Ready:
        return Ready(self.node_id, max(0, self.cfg.worker_credit - self.stale), list(self.executor.loaded),
                     self.executor.budget_bytes() // MB, dict(self.executor.model_mb))

    def on_rejoin(self, m: Rejoin) -> None:
        log.warning("coordinator asks for a rejoin (%s): starting a new incarnation", m.reason)
        self.fire(Event.REJOIN, time.monotonic(), self.primary, self.tracker.term)

    def on_task(self, m: Task) -> None:
        for task_id in m.acks:  # piggybacked ResultAcks (final): as on_result_ack, task or no task
            self.unacked.pop(task_id, None)
        if m.term < self.tracker.term or not self.joined:
            log.warning("task %s from an old term (%d < %d) ignored", m.task_id, m.term, self.tracker.term)
            return
        if m.task_id in self.inflight or m.task_id in self.unacked:
            return  # duplicate delivery
        if len(self.inflight) + self.stale >= self.cfg.worker_credit:
            # Still run it (the query must not be lost), but this is a flow-control bug worth seeing.
            log.warning("task %s arrived beyond the %d slots this worker offers", m.task_id, self.cfg.worker_credit)
        self.inflight[m.task_id] = m
        # Cheap work (noop on local inputs: InlineNoop) runs here, without the executor's thread hops.
        if (result := self.executor.inline.run(m)) is not None:
            self._finished(result)
        else:  # everything else runs in the pipeline, off this loop
            self.executor.submit(m, self.generation)

    def on_bundle(self, m: Bundle) -> None:
        for msg in m.messages:  # several messages from our primary in one frame: each as if alone (no Bundle)
            try:
                self.handlers.get(type(msg), lambda x: log.warning("%s in a bundle ignored", x.TYPE))(msg)
            except Exception:
                log.exception("handler for %s failed", msg.TYPE)

    def on_result_ack(self, m: ResultAck) -> None:
        if m.final:
            self.unacked.pop(m.task_id, None)

    def on_preload(self, m: Preload) -> None:
        log.info("preloading %s%s (this worker is in its pool)", m.model, f" with {m.weights}" if m.weights else "")
        self.executor.preload(m.model, m.weights)  # loads off this loop (worker/executor.py)

    def on_drop(self, m: Drop) -> None:
        n = self.store.drop(m.name, m.version)
        log.info("dropped %d replica(s) of %s%s", n, m.name, f" v{m.version}" if m.version else "")

    def on_error(self, m: Error) -> None:
        if m.code == ErrorCode.NOT_PRIMARY:
            return  # the standby refused: the Join still counted as a vote; keep trying
        log.warning("coordinator error: %s", m.message)
