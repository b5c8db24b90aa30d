"""The coordinator daemon: sockets, the one loop, standby replication and Binary Star failover.

Sockets (port P = the control port of ``addr``):
  P     ROUTER  workers and clients (DEALER) — requests, worker protocol, commands
  P+1   PUB     heartbeats, membership view, log stream, state updates for the standby
  P+2   PULL    log records pushed by every node, republished on PUB
and, when a peer coordinator is configured, a SUB to the peer's PUB and a DEALER to its ROUTER.

Failover rules (zguide Binary Star): a standby promotes itself only when the primary has been
silent for ``failover_timeout`` *and* a worker has asked it for service in that time (a standby cut
off from everyone stays standby). Each promotion raises the term; a primary that hears a primary
with a higher term demotes itself to standby and re-syncs, and workers ignore older terms.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path

import zmq

from broker.coordinator import PRIMARY, PROBING, STANDBY, Coordinator
from broker.jobs import Job
from common import security
from common.config import Config
from common.failure_detector import LOCAL_STALL, PhiAccrual
from common.logstream import LOG_PORT_OFFSET, MAX_LOG_FRAME, PUB_PORT_OFFSET
from common.loop import run_until_stopped
from common.protocol import (
    CoordinatorHeartbeat,
    LogRecord,
    Message,
    StateRequest,
    StateSnapshot,
    StateUpdate,
    Topic,
)
from common.rpc import next_req
from common.transport import host_port, make_socket, offset_addr, router_send, tcp, try_decode

log = logging.getLogger("idunno.coordinator.server")

# How long one drain of the ROUTER may run before the loop ticks (timers, failure detection).
DRAIN_BUDGET = 0.05
# Log records per second (and burst) one sender may push; more are dropped and counted. Senders are
# told apart by key role and claimed node name, in a bounded table (the rest share one bucket).
LOG_RATE, LOG_BURST, MAX_LOG_SENDERS = 200.0, 2000.0, 1024
# What a client or worker key may read on the PUB socket; everything else (the state journal) is for
# coordinator keys only (see _drain_subscriptions).
PUBLIC_TOPICS = (Topic.HEARTBEAT, Topic.VIEW, Topic.LOG)


class ZmqNet:
    def __init__(self, router: zmq.Socket, pub: zmq.Socket) -> None:
        self.router = router
        self.pub = pub

    def send(self, identity: bytes, msg: Message) -> bool:
        return router_send(self.router, identity, msg)

    def publish(self, topic: bytes, msg: Message) -> None:
        self.publish_raw(topic, msg.encode())

    def publish_raw(self, topic: bytes, payload: bytes) -> None:
        try:
            self.pub.send_multipart([topic, payload], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # PUB never blocks; subscribers detect the gap by sequence number


class ResultWriter:
    """Writes finished jobs' results to SDFS off the loop thread (the loop must never block)."""

    def __init__(self, cfg: Config, addr: str, spool: Path) -> None:
        self.cfg = cfg
        self.addr = addr
        # Staging files live in the coordinator's own directory, not /tmp: a coordinator killed
        # mid-write leaves its file where the next start (this one) removes it.
        self.spool = spool
        self.spool.mkdir(parents=True, exist_ok=True)
        for stale in self.spool.glob("results-*.json"):
            stale.unlink(missing_ok=True)
        self.queue: queue.Queue[tuple[str, list[dict]] | None] = queue.Queue()
        self.thread = threading.Thread(target=self.run, name="result-writer", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        items = [job.results[i] | {"qid": job.qid(i)} for i in sorted(job.results)]
        self.queue.put((job.job_id, items))

    def run(self) -> None:
        from sdfs.client import SdfsClient  # noqa: PLC0415 - only this thread needs a client

        client = SdfsClient(self.cfg, [self.addr], zmq.Context.instance())
        try:
            while (item := self.queue.get()) is not None:
                job_id, items = item
                fd, tmp = tempfile.mkstemp(prefix="results-", suffix=".json", dir=self.spool)
                try:
                    with os.fdopen(fd, "w") as fh:
                        json.dump({"job": job_id, "results": items}, fh)
                    for attempt in range(5):
                        try:
                            v = client.put(tmp, f"results/{job_id}")
                            log.info("results of %s written to SDFS results/%s v%d", job_id, job_id, v)
                            break
                        except Exception as exc:
                            log.warning("writing results of %s failed (attempt %d): %s", job_id, attempt + 1, exc)
                            time.sleep(1.0)  # writer thread, not the loop
                finally:
                    Path(tmp).unlink(missing_ok=True)
        finally:
            client.close()

    def stop(self) -> None:
        self.queue.put(None)


class CoordinatorServer:
    def __init__(
        self,
        cfg: Config,
        addr: str,
        peer: str | None = None,
        standby: bool = False,
        data_dir: str | None = None,
        scheduler: str = "fair-time",
        ctx: zmq.Context | None = None,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        host, port = host_port(addr)
        self.addr = addr
        self.peer = peer or None
        self.data_dir = Path(data_dir or Path(cfg.data_dir) / f"coordinator-{port}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.router = make_socket(self.ctx, zmq.ROUTER, cfg.max_frame_bytes, server=True)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker with the same id takes over
        self.router.bind(tcp(addr))
        # XPUB with manual subscriptions: the state journal (Topic.STATE) goes to coordinator keys only.
        self.pub = make_socket(self.ctx, zmq.XPUB, cfg.max_frame_bytes, server=True)
        self.pub.setsockopt(zmq.XPUB_MANUAL, 1)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.bind(tcp(offset_addr(addr, PUB_PORT_OFFSET)))
        # Only coordinator and worker keys may push log records (ZAP domain NODES).
        self.pull = make_socket(self.ctx, zmq.PULL, min(cfg.max_frame_bytes, MAX_LOG_FRAME), server=True,
                                domain=security.NODES)
        self.pull.bind(tcp(offset_addr(addr, LOG_PORT_OFFSET)))
        self.net = ZmqNet(self.router, self.pub)
        self.writer = ResultWriter(cfg, addr, self.data_dir / "spool")
        stored_term = self._load_term()
        role = STANDBY if standby else (PROBING if self.peer else PRIMARY)
        self.core = Coordinator(
            cfg, addr, self.net, role=role, term=stored_term + (1 if role == PRIMARY else 0),
            db_path=str(self.data_dir / "metadata.sqlite"), scheduler=scheduler, on_job_done=self.writer.submit,
            grant_key=security.CURRENT.grant_key if security.CURRENT else None,
        )
        if role == PRIMARY:
            self._save_term()
        self.started = time.monotonic()
        self.last_expiry = self.started
        self.peer_sub: zmq.Socket | None = None
        self.peer_dealer: zmq.Socket | None = None
        self.peer_fd: PhiAccrual | None = None  # adaptive detector over the peer's heartbeats
        self.last_step = self.started
        self.peer_role = ""
        self.peer_term = 0
        self.snapshot_req: int | None = None
        self.snapshot_sent = 0.0
        self.buffered: list[StateUpdate] = []
        self.synced = False
        if self.peer:
            self.peer_sub = make_socket(self.ctx, zmq.SUB, cfg.max_frame_bytes)
            for topic in (Topic.HEARTBEAT, Topic.STATE):
                self.peer_sub.setsockopt(zmq.SUBSCRIBE, topic)
            self.peer_sub.setsockopt(zmq.RCVHWM, 100_000)
            self.peer_sub.connect(tcp(offset_addr(self.peer, PUB_PORT_OFFSET)))
            self.peer_dealer = make_socket(self.ctx, zmq.DEALER, cfg.max_frame_bytes)
            self.peer_dealer.connect(tcp(self.peer))
        self.poller = zmq.Poller()
        for s in (self.router, self.pull, self.peer_sub, self.peer_dealer, self.pub):
            if s is not None:
                self.poller.register(s, zmq.POLLIN)
        self.stop_event = threading.Event()
        self.metrics: dict | None = None  # refreshed by the loop for the Prometheus thread
        self.next_metrics = 0.0
        self.log_buckets: dict[tuple[str, str], list[float]] = {}  # sender -> [tokens, last refill]
        log.info("coordinator %s up as %s (term %d, peer %s)", addr, role, self.core.term, self.peer or "none")

    # -- term persistence ---------------------------------------------------------------------
    def _load_term(self) -> int:
        try:
            return int((self.data_dir / "term").read_text().strip())
        except (OSError, ValueError):
            return 0

    def _save_term(self) -> None:
        (self.data_dir / "term").write_text(str(self.core.term))

    # -- loop -----------------------------------------------------------------------------------
    def step(self, now: float) -> None:
        gap = now - self.last_step
        self.last_step = now
        self.core.loop_stalled(gap)
        if gap > LOCAL_STALL and self.peer_fd is not None:
            self.peer_fd.excuse(gap)  # our own stall is not the peer's silence
        timeout = max(0.0, min(0.1, self.core.next_deadline(now) - now))
        backlog = False
        # Membership and control traffic first: the ROUTER (heartbeats, results, requests) and the
        # peer's heartbeats, then bulk log records. Each drain is bounded, so no socket starves another.
        ready = dict(self.poller.poll(int(timeout * 1000)))
        if self.peer_sub in ready:
            self._drain_peer_sub()
        if self.router in ready:
            backlog = self._drain_router()
        if self.peer_dealer in ready:
            self._drain_peer_dealer()
        if self.pull in ready:
            self._drain_logs()
        if self.pub in ready:
            self._drain_subscriptions()
        now = time.monotonic()
        self._failover_rules(now)
        # With unread messages left (the drain hit its budget), heartbeats may be among them: read on
        # before declaring anyone failed, unless the backlog has held expiry off for too long.
        defer = backlog and now - self.last_expiry < self.cfg.failure_timeout
        if not defer:
            self.last_expiry = now
        self.core.tick(now, expire=not defer)
        if self.cfg.metrics_port and now >= self.next_metrics:
            self.next_metrics = now + 1.0
            self.metrics = self.core.metrics_snapshot(now)

    def run(self) -> None:
        try:
            run_until_stopped(self.step, self.stop_event, log)
        finally:
            self.close()

    def close(self) -> None:
        self.writer.stop()
        for s in (self.router, self.pub, self.pull, self.peer_sub, self.peer_dealer):
            if s is not None:
                s.close(0)

    def _drain_router(self) -> bool:
        """Handle waiting messages for at most DRAIN_BUDGET seconds; True if some are left unread."""
        budget_end = time.monotonic() + DRAIN_BUDGET
        for _ in range(1024):
            if time.monotonic() > budget_end:
                return True
            try:
                frames = self.router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            if len(frames) != 2:
                log.warning("dropped message with %d frames", len(frames))
                continue
            ident = frames[0].bytes
            msg = try_decode(frames[1].bytes, self.cfg.max_frame_bytes, f"peer {ident[:40]!r}")
            if msg is not None:
                t0 = time.monotonic()
                # The sender's role comes from its CURVE key (ZAP User-Id), never from the message.
                self.core.handle(ident, msg, t0, security.role_of(frames[1]))
                self.core.note_handling(msg.TYPE, time.monotonic() - t0)
        return True

    def _drain_logs(self) -> None:
        budget_end = time.monotonic() + DRAIN_BUDGET / 2  # logs are bulk: they never hold up the loop
        for _ in range(1000):
            if time.monotonic() > budget_end:
                return
            try:
                frame = self.pull.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = try_decode(frame.bytes, MAX_LOG_FRAME, "log pusher")
            if isinstance(msg, LogRecord) and self._log_allowed((security.role_of(frame) or "", msg.node[:200])):
                self.net.publish_raw(Topic.LOG, frame.bytes)

    def _drain_subscriptions(self) -> None:
        """Apply each subscriber's (un)subscription; a non-coordinator key gets only what it covers of
        PUBLIC_TOPICS ("everything" becomes the public topics; the state journal, nothing)."""
        for _ in range(1000):
            try:
                frame = self.pub.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = frame.bytes
            if not data or data[0] not in (0, 1):
                continue
            option = zmq.SUBSCRIBE if data[0] == 1 else zmq.UNSUBSCRIBE
            topic = data[1:]
            role = security.role_of(frame)
            if role is None or role == security.COORDINATOR:
                topics = [topic]
            else:  # the public topics this subscription covers, never more
                topics = list(dict.fromkeys([t for t in PUBLIC_TOPICS if t.startswith(topic)]
                                            + [topic for t in PUBLIC_TOPICS if topic.startswith(t)]))
                if not topics:
                    self.core.drop("state_subscription", time.monotonic(), "a %s key's subscription to %r refused",
                                   role or "unknown", topic[:40])
            for t in topics:  # XPUB_MANUAL: applies to the pipe whose message was read last
                self.pub.setsockopt(option, t)

    def _log_allowed(self, sender: tuple[str, str]) -> bool:
        """Token bucket per sender: a flood of records from one node costs the others nothing."""
        now = time.monotonic()
        bucket = self.log_buckets.get(sender)
        if bucket is None:
            if len(self.log_buckets) >= MAX_LOG_SENDERS:
                sender = (sender[0], "*")  # names made up by the thousand share one bucket
                bucket = self.log_buckets.get(sender)
            if bucket is None:
                bucket = self.log_buckets[sender] = [LOG_BURST, now]
        bucket[0] = min(LOG_BURST, bucket[0] + (now - bucket[1]) * LOG_RATE)
        bucket[1] = now
        if bucket[0] < 1.0:
            self.core.drop("log_rate", now, "log records from %r over %.0f/s dropped", sender[1][:80], LOG_RATE)
            return False
        bucket[0] -= 1.0
        return True

    # -- peer coordinator ---------------------------------------------------------------------
    def _drain_peer_sub(self) -> None:
        if self.peer_sub is None:  # only polled when a peer is configured
            return
        for _ in range(10_000):
            try:
                frames = self.peer_sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            msg = try_decode(frames[1], self.cfg.max_frame_bytes, "peer coordinator")
            if isinstance(msg, CoordinatorHeartbeat):
                heard = time.monotonic()
                if self.peer_fd is None:
                    self.peer_fd = PhiAccrual(self.cfg.detector_params(self.cfg.failover_timeout), heard)
                else:
                    self.peer_fd.heartbeat(heard)
                self.peer_role, self.peer_term = msg.role, msg.term
            elif isinstance(msg, StateUpdate):
                self._on_state_update(msg)

    def _drain_peer_dealer(self) -> None:
        if self.peer_dealer is None:
            return
        for _ in range(100):
            try:
                frame = self.peer_dealer.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = try_decode(frame, self.cfg.max_frame_bytes, "peer coordinator")
            if isinstance(msg, StateSnapshot) and msg.req == self.snapshot_req and self.core.role == STANDBY:
                now = time.monotonic()
                self.core.restore(msg.state, msg.seq, msg.term, now)
                self.synced = True
                self.snapshot_req = None
                pending, self.buffered = self.buffered, []
                for u in pending:
                    self._on_state_update(u)
                log.info("standby synced: state seq %d, term %d, %d jobs", msg.seq, msg.term, len(self.core.jobs.jobs))

    def _request_snapshot(self, now: float) -> None:
        if self.peer_dealer is None:
            return
        self.snapshot_req = next_req()
        self.snapshot_sent = now
        self.synced = False
        self.buffered = []
        self.peer_dealer.send(StateRequest(self.snapshot_req).encode(), flags=zmq.NOBLOCK)

    def _on_state_update(self, u: StateUpdate) -> None:
        if self.core.role != STANDBY:
            return
        if not self.synced:
            self.buffered.append(u)
            return
        if u.seq <= self.core.state_seq:
            return
        if u.seq != self.core.state_seq + 1:
            log.warning("state update gap (have %d, got %d): re-syncing", self.core.state_seq, u.seq)
            self._request_snapshot(time.monotonic())
            return
        self.core.apply_op(u.op, u.data, time.monotonic())
        self.core.state_seq = u.seq
        self.core.term = max(self.core.term, u.term)

    def _failover_rules(self, now: float) -> None:
        core = self.core
        peer_alive = self.peer_fd is not None and not self.peer_fd.failed(now)
        if core.role == PROBING:
            if peer_alive and self.peer_role == PRIMARY:
                core.role = STANDBY
                core.term = max(core.term, self.peer_term)
                log.info("peer %s is primary (term %d): starting as standby", self.peer, self.peer_term)
            elif now - self.started > self.cfg.failover_timeout:
                core.role = PRIMARY
                core.term = max(core.term, self.peer_term) + 1
                self._save_term()
                log.info("no primary heard: starting as primary (term %d)", core.term)
            return
        if core.role == PRIMARY:
            if peer_alive and self.peer_role == PRIMARY and (
                self.peer_term > core.term or (self.peer_term == core.term and self.peer < self.addr)
            ):
                core.demote()
                core.term = self.peer_term
                self.synced = False  # our state is stale: take the new primary's snapshot
            return
        # standby
        if peer_alive and self.peer_role == PRIMARY:
            if not self.synced and (self.snapshot_req is None or now - self.snapshot_sent > self.cfg.request_timeout):
                self._request_snapshot(now)
            return
        voted = now - core.last_vote < max(2 * self.cfg.failover_timeout, 2.0)
        if not peer_alive and voted and now - self.started > self.cfg.failover_timeout:
            core.term = max(core.term, self.peer_term)
            core.promote(now)
            self._save_term()
