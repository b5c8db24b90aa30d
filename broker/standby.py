"""The coordinator's side of its peer: heartbeats heard, and the standby's snapshot transfer and updates.

:class:`PeerLink` owns the two sockets to the peer coordinator (a SUB to its PUB for heartbeats and
state updates, a DEALER to its ROUTER for the snapshot transfer) and the adaptive detector over the
peer's heartbeats. :class:`StandbySync` is the standby's client of the transfer (``broker/snapshot.py``)
and applies the sequenced updates after it (zguide Clone). Neither decides anything about roles:
they report ``SYNC_DONE``, ``UPDATE_GAP`` and ``UPDATE_NEWER_TERM`` to the failover machine
(``common/failover.py``) through ``fire``, and the server runs the actions of its table.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from broker.snapshot import SnapshotError, SnapshotReceiver, install
from common.config import Config
from common.failover import STANDBY_STATES, START_EVENT, Action, Event, State, coordinator_machine, peer_event
from common.failure_detector import PhiAccrual
from common.logstream import PUB_PORT_OFFSET
from common.protocol import (
    CoordinatorHeartbeat,
    Error,
    StateChunk,
    StateFetch,
    StateRequest,
    StateUpdate,
    StateUpdates,
    Topic,
)
from common.rpc import next_req
from common.transport import drain_published, make_socket, offset_addr, tcp, try_decode

log = logging.getLogger("idunno.coordinator.server")

# How long one drain of the peer's DEALER may run before the loop ticks: decoding chunks is real work.
DRAIN_BUDGET = 0.05


class PeerLink:
    """The sockets to the peer coordinator and what was last heard from it."""

    def __init__(self, ctx: zmq.Context, cfg: Config, peer: str) -> None:
        self.cfg = cfg
        self.addr = peer
        self.sub = make_socket(ctx, zmq.SUB, cfg.max_frame_bytes)
        for topic in (Topic.HEARTBEAT, Topic.STATE):
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.sub.connect(tcp(offset_addr(peer, PUB_PORT_OFFSET)))
        self.dealer = make_socket(ctx, zmq.DEALER, cfg.max_frame_bytes)
        self.dealer.connect(tcp(peer))
        self.fd: PhiAccrual | None = None  # adaptive detector over the peer's heartbeats
        self.role = ""
        self.term = 0

    def alive(self, now: float) -> bool:
        return self.fd is not None and not self.fd.failed(now)

    def excuse(self, gap: float) -> None:
        if self.fd is not None:
            self.fd.excuse(gap)  # our own stall is not the peer's silence

    def drain_sub(self, on_update: Callable[[StateUpdate], None]) -> None:
        for msg in drain_published(self.sub, self.cfg.max_frame_bytes, "peer coordinator", 10_000):
            if isinstance(msg, CoordinatorHeartbeat):
                heard = time.monotonic()
                if self.fd is None:
                    self.fd = PhiAccrual(self.cfg.detector_params(self.cfg.failover_timeout), heard)
                else:
                    self.fd.heartbeat(heard)
                self.role, self.term = msg.role, msg.term
            elif isinstance(msg, StateUpdate):
                on_update(msg)
            elif isinstance(msg, StateUpdates):  # one loop iteration's ops: in order, each checked for a gap
                for u in msg.updates():
                    on_update(u)

    def send(self, payload: bytes) -> bool:
        try:
            self.dealer.send(payload, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False  # not connected yet: the caller's timer asks again

    def close(self) -> None:
        self.sub.close(0)
        self.dealer.close(0)


class StandbySync:
    """The standby's snapshot transfer from the primary and the state updates that follow it."""

    def __init__(self, cfg: Config, core: Any, link: PeerLink, state: Callable[[], State],
                 fire: Callable[[Event, float, int], None]) -> None:
        self.cfg = cfg
        self.core = core
        self.link = link
        self.state = state  # the failover machine's state: only a standby syncs
        self.fire = fire
        self.transfer: SnapshotReceiver | None = None  # the snapshot being pulled from the primary
        self.snapshot_sent = -1e9
        self.buffered: list[StateUpdate] = []  # updates heard before the snapshot is installed

    def drop(self) -> None:
        """Forget the transfer under way and the updates buffered for it."""
        self.transfer = None
        self.buffered = []

    def drain(self) -> None:
        budget_end = time.monotonic() + DRAIN_BUDGET
        for _ in range(100):
            if time.monotonic() > budget_end:
                return
            try:
                frame = self.link.dealer.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = try_decode(frame, self.cfg.max_frame_bytes, "peer coordinator")
            t = self.transfer
            if t is None or self.state() not in STANDBY_STATES or getattr(msg, "req", None) != t.req:
                continue  # a chunk of a superseded transfer, or nothing we asked for
            now = time.monotonic()
            if isinstance(msg, StateChunk):
                try:
                    t.add(msg.index, msg.data, msg.last, now)
                except SnapshotError as exc:
                    log.warning("snapshot transfer %d failed: %s; starting over", t.req, exc)
                    self.transfer = None
                    continue
                if t.done:
                    self._install(t, now)
                else:
                    self._fetch(t.wanted())
            elif isinstance(msg, Error):
                log.warning("snapshot transfer %d refused by the primary: %s", t.req, msg.message)
                self.transfer = None  # sync() asks again after request_timeout

    def _install(self, t: SnapshotReceiver, now: float) -> None:
        self.transfer = None
        t0 = time.monotonic()
        seq, term = install(self.core, t, now)
        gc.freeze()  # the replicated state is long-lived: keep the cyclic GC from walking it on every full pass
        took = time.monotonic() - t0
        self.fire(Event.SYNC_DONE, now, term)
        pending, self.buffered = self.buffered, []
        for u in pending:
            self.on_update(u)
        log.info("standby synced: state seq %d (now %d), term %d, %d jobs, %d files; %.1f MB in %d chunks in "
                 "%.2fs (%d resumes), installed in %.2fs", seq, self.core.state_seq, term, len(self.core.jobs.jobs),
                 len(self.core.master.files), t.bytes / 1e6, t.have, now - t.started, t.resumes, took)

    def _fetch(self, indexes: list[int]) -> None:
        t = self.transfer
        if t is None:
            return
        for i in indexes:
            if not self.link.send(StateFetch(t.req, i, t.have).encode()):
                return  # not connected yet: the resume timer asks again

    def request_snapshot(self, now: float) -> None:
        self.transfer = SnapshotReceiver(next_req(), self.cfg.transfer_window, now, sink=self.core.master.apply_entries)
        self.snapshot_sent = now
        self.buffered = []
        if not self.link.send(StateRequest(self.transfer.req).encode()):
            self.transfer = None
            return
        self._fetch(self.transfer.wanted())

    def sync(self, now: float) -> None:
        """Standby with a live primary: start, resume or restart the snapshot transfer as needed."""
        t = self.transfer
        if t is None:
            if now - self.snapshot_sent > self.cfg.request_timeout:
                self.request_snapshot(now)
            return
        if now - t.last_progress > self.cfg.request_timeout:
            if t.resumes >= 3:
                log.warning("snapshot transfer %d stuck at chunk %d: starting over", t.req, t.have)
                self.request_snapshot(now)
            else:
                log.info("snapshot transfer %d: no chunk for %.1fs, resuming at chunk %d", t.req,
                         now - t.last_progress, t.have)
                self._fetch(t.resume(now))

    def on_update(self, u: StateUpdate) -> None:
        state = self.state()
        if state in (State.STANDBY_EMPTY, State.STANDBY_SYNCING):  # not synced: kept for after the install
            self.buffered.append(u)
            return
        if state != State.STANDBY_SYNCED:
            return
        now = time.monotonic()
        if u.term > self.core.term:
            # A primary of a newer term (a restarted one continues its own stored history, whose
            # seq numbers may overlap ours): its snapshot, not a patch onto our copy.
            log.warning("state update of term %d (ours %d): re-syncing", u.term, self.core.term)
            self.fire(Event.UPDATE_NEWER_TERM, now, u.term)
            return
        if u.seq <= self.core.state_seq:
            return
        if u.seq != self.core.state_seq + 1:
            log.warning("state update gap (have %d, got %d): re-syncing", self.core.state_seq, u.seq)
            self.fire(Event.UPDATE_GAP, now, u.term)
            return
        self.core.apply_update(u.seq, u.term, u.op, u.data, now)


class Failover:
    """The coordinator's failover machine (common/failover.py, COORDINATOR_TABLE) and its actions.

    Once per loop step :meth:`step` turns what was heard from the peer into one event; the standby's
    transfer reports its own events through :meth:`fire`. The actions run on the ``Coordinator``
    (term, take_over, promote, demote) and on the standby's :class:`StandbySync`. No sockets here:
    the unit tests drive it with a fake peer and a fake coordinator in virtual time.
    """

    def __init__(self, cfg: Config, core: Any, addr: str, link: PeerLink | None) -> None:
        self.cfg = cfg
        self.core = core
        self.addr = addr
        self.link = link
        self.fsm = coordinator_machine()
        self.sync = StandbySync(cfg, core, link, lambda: self.fsm.state, self.fire) if link is not None else None
        self.started = 0.0  # when the coordinator began serving (set by the server)
        self.refusal_logged = False
        self.actions: dict[Action, Callable[[float, int], None]] = {
            Action.ADOPT_TERM: self._adopt_term,
            Action.NEW_TERM: self._new_term,
            Action.TAKE_OVER: lambda now, _term: self.core.take_over(now),
            Action.PROMOTE: self._promote,
            Action.DEMOTE: self._demote,
            Action.SYNC: lambda now, _term: self.sync.sync(now) if self.sync else None,
            Action.RESYNC: lambda now, _term: self.sync.request_snapshot(now) if self.sync else None,
            Action.DROP_TRANSFER: lambda _now, _term: self.sync.drop() if self.sync else None,
            Action.REFUSE_PROMOTION: self._refuse_promotion,
            Action.WARN_PARTIAL: lambda _now, _term: log.warning(
                "promoting with the state of an unfinished re-sync (the primary died during it)"),
            Action.LOG_PEER_PRIMARY: lambda _now, term: log.info(
                "peer %s is primary (term %d): starting as standby", self.link and self.link.addr, term),
            Action.LOG_NO_PRIMARY: lambda _now, _term: log.info(
                "no primary heard: starting as primary (term %d)", self.core.term),
        }

    def start(self, standby: bool, now: float) -> None:
        """Take the start-up role: standby (--standby), probing (a peer), or primary with a new term."""
        self.started = now
        self.fire(START_EVENT[standby, self.link is not None], now, 0)

    def step(self, now: float) -> None:
        link = self.link
        event = peer_event(
            peer_alive=link is not None and link.alive(now), peer_role=link.role if link else "",
            peer_term=link.term if link else 0, peer_addr=link.addr if link else "", term=self.core.term,
            addr=self.addr, up_for=now - self.started, since_vote=now - self.core.last_vote,
            failover_timeout=self.cfg.failover_timeout,
        )
        self.fire(event, now, link.term if link else 0)

    def fire(self, event: Event, now: float, term: int) -> None:
        """Move the machine by ``event`` (carrying ``term``) and run the actions of its row."""
        before = self.fsm.state
        actions = self.fsm.handle(event)
        if self.fsm.state != before:
            log.debug("failover: %s --%s--> %s", before, event, self.fsm.state)
            # The one place the role is set from outside the Coordinator (its take_over, promote and
            # demote set the same value themselves).
            self.core.role = self.fsm.role
            self.core.synced = self.fsm.state in (State.STANDBY_SYNCED, State.PRIMARY)
        for action in actions:
            self.actions[action](now, term)

    def _adopt_term(self, now: float, term: int) -> None:
        self.core.term = max(self.core.term, term)  # persisted (fsync'd) by the setter when it grows

    def _new_term(self, now: float, term: int) -> None:
        self.core.term += 1  # persisted (fsync'd) by the term's setter before anything announces it

    def _promote(self, now: float, term: int) -> None:
        t0 = time.monotonic()
        self.core.promote(now)
        log.info("promotion took %.0f ms", (time.monotonic() - t0) * 1000)

    def _demote(self, now: float, term: int) -> None:
        self.core.demote()
        if self.sync is not None:
            self.sync.drop()  # our state is stale: the next step takes the new primary's snapshot

    def _refuse_promotion(self, now: float, term: int) -> None:
        # Never held the primary's state (the primary may still be loading its own): taking over now
        # would present an empty cluster and hand out job ids and versions again.
        if not self.refusal_logged:
            self.refusal_logged = True
            log.warning("not promoting: this standby never synced with a primary (start it without "
                        "--standby to let it start a cluster on its own state)")
