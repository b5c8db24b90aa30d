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

import gc
import json
import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from broker.coordinator import PRIMARY, PROBING, STANDBY, Coordinator
from broker.jobs import Job
from broker.snapshot import SnapshotError, SnapshotReceiver, install
from broker.state_store import StateStore
from common import security
from common.config import Config
from common.failure_detector import LOCAL_STALL, PhiAccrual
from common.logstream import LOG_PORT_OFFSET, MAX_LOG_FRAME, PUB_PORT_OFFSET
from common.loop import run_until_stopped
from common.protocol import (
    CoordinatorHeartbeat,
    Error,
    LogRecord,
    Message,
    StateChunk,
    StateFetch,
    StateRequest,
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
    """Writes finished jobs' results to SDFS off the loop thread (the loop must never block).

    Retried with back-off until the write succeeds (each failure logged), for as long as this
    coordinator is primary: a standby writes nothing, and the coordinator that becomes primary
    writes every finished job not recorded as written (``Coordinator.write_missing_results``).
    A success is reported through ``done`` for the loop to record (op ``job.results_written``).
    """

    BACKOFF_FIRST = 1.0  # seconds before the first retry, doubled after each failure ...
    BACKOFF_MAX = 30.0  # ... up to this

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
        self.done: queue.Queue[tuple[str, int]] = queue.Queue()  # (job id, SDFS version) written
        self.active = True  # set by the loop: only a primary writes
        self.owed: set[str] = set()  # queued or being written (loop thread adds, writer removes)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.failures = 0
        self.thread = threading.Thread(target=self.run, name="result-writer", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if job.job_id in self.owed:
                return  # already on its way (a promotion asks again for every owed job)
            self.owed.add(job.job_id)
        self.active = True  # only a primary submits
        items = job.rows()
        self.queue.put((job.job_id, items))

    def run(self) -> None:
        from sdfs.client import SdfsClient  # noqa: PLC0415 - only this thread needs a client

        client = SdfsClient(self.cfg, [self.addr], zmq.Context.instance())
        try:
            while (item := self.queue.get()) is not None:
                job_id, items = item
                try:
                    self._write(client, job_id, items)
                finally:
                    with self.lock:
                        self.owed.discard(job_id)
        finally:
            client.close()

    def _write(self, client: Any, job_id: str, items: list[dict]) -> None:
        fd, tmp = tempfile.mkstemp(prefix="results-", suffix=".json", dir=self.spool)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"job": job_id, "results": items}, fh)
            delay, attempt = self.BACKOFF_FIRST, 0
            while self.active and not self.stopping.is_set():
                attempt += 1
                try:
                    v = client.put(tmp, f"results/{job_id}")
                except Exception as exc:
                    self.failures += 1
                    log.warning("writing results of %s failed (attempt %d, next in %.0fs): %s",
                                job_id, attempt, delay, exc)
                    self.stopping.wait(delay)  # writer thread, not the loop
                    delay = min(self.BACKOFF_MAX, delay * 2)
                    continue
                log.info("results of %s written to SDFS results/%s v%d", job_id, job_id, v)
                self.done.put((job_id, v))
                return
            log.info("results of %s not written here: no longer primary (the primary writes them)", job_id)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def written(self) -> list[tuple[str, int]]:
        out = []
        while True:
            try:
                out.append(self.done.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        self.stopping.set()
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
        self.store = StateStore(self.data_dir / "state.sqlite", chunk_bytes=cfg.chunk_bytes,
                                compact_ops=cfg.state_compact_ops)
        role = STANDBY if standby else (PROBING if self.peer else PRIMARY)
        # Restored before serving, as a non-primary (replaying a finished job must not write its
        # results yet); the role is taken afterwards, with a term above any stored or restored.
        self.core = Coordinator(
            cfg, addr, self.net, role=STANDBY, term=self._load_term(),
            db_path=str(self.data_dir / "metadata.sqlite"), scheduler=scheduler, on_job_done=self.writer.submit,
            store=self.store, persist_term=self._save_term,
            grant_key=security.CURRENT.grant_key if security.CURRENT else None,
        )
        t0 = time.monotonic()
        restored = self.core.load_state(t0)
        if restored["jobs"]:
            log.info("state restored in %.2fs", time.monotonic() - t0)
        self.core.role = role
        if role == PRIMARY:
            self.core.term += 1  # persisted (fsync'd) by the term's setter before anything announces it
            self.core.take_over(time.monotonic())
        gc.freeze()  # the state loaded from disk is long-lived: full GC passes need not walk it (loop stalls)
        self.started = time.monotonic()
        self.last_expiry = self.started
        self.peer_sub: zmq.Socket | None = None
        self.peer_dealer: zmq.Socket | None = None
        self.peer_fd: PhiAccrual | None = None  # adaptive detector over the peer's heartbeats
        self.last_step = self.started
        self.peer_role = ""
        self.peer_term = 0
        self.transfer: SnapshotReceiver | None = None  # the snapshot being pulled from the primary
        self.snapshot_sent = -1e9
        self.buffered: list[StateUpdate] = []
        self.ever_synced = False
        self.refusal_logged = False
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
        self.compact_loop_max = 0.0  # longest time a compaction held the loop (seconds)
        self.log_buckets: dict[tuple[str, str], list[float]] = {}  # sender -> [tokens, last refill]
        log.info("coordinator %s up as %s (term %d, peer %s)", addr, role, self.core.term, self.peer or "none")

    # -- term persistence ---------------------------------------------------------------------
    def _load_term(self) -> int:
        try:
            return int((self.data_dir / "term").read_text().strip())
        except (OSError, ValueError):
            return 0

    def _save_term(self, term: int) -> None:
        """Persist a new term before it is announced (the Coordinator's term setter calls this):
        written to a temporary file, fsync'd, renamed over ``term``, directory fsync'd, so a
        crash or power loss leaves the old or the new number, never none."""
        path = self.data_dir / "term"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(str(term))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.data_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- loop -----------------------------------------------------------------------------------
    def _stalled(self, gap: float) -> None:
        self.core.loop_stalled(gap)
        if gap > LOCAL_STALL and self.peer_fd is not None:
            self.peer_fd.excuse(gap)  # our own stall is not the peer's silence

    def step(self, now: float) -> None:
        self._stalled(now - self.last_step)
        self.last_step = now
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
        # A slow handler (a large message, a GC pause, a busy new primary) is a stall of this loop too,
        # and it must be excused *before* this step's expiry, or heartbeats still waiting unread in the
        # socket would count as silence (finding: a busy new primary declared every worker failed).
        polled = self.last_step + timeout
        if now - polled > LOCAL_STALL:
            self._stalled(now - polled)
            self.last_step = now  # the next step's gap starts after what was excused here
        self._failover_rules(now)
        # With unread messages left (the drain hit its budget), heartbeats may be among them: read on
        # before declaring anyone failed, unless the backlog has held expiry off for too long.
        defer = backlog and now - self.last_expiry < self.cfg.failure_timeout
        if not defer:
            self.last_expiry = now
        self.core.tick(now, expire=not defer)
        self._durability(now)
        if self.cfg.metrics_port and now >= self.next_metrics:
            self.next_metrics = now + 1.0
            self.metrics = self.core.metrics_snapshot(now)

    def _durability(self, now: float) -> None:
        """Once per iteration: commit the ops of this iteration (group commit), record results
        files written, and start a compaction when the journal has grown past the threshold."""
        core = self.core
        self.writer.active = core.role == PRIMARY
        for job_id, version in self.writer.written():
            if not core.results_written(job_id, version, now):
                log.warning("results/%s v%d written but not recorded (not primary, or written before): "
                            "an extra version of the same results", job_id, version)
        core.commit()
        for seq, seconds, size, _ in self.store.poll():
            if seq >= 0:
                log.debug("compaction at seq %d took %.2fs (%d bytes)", seq, seconds, size)
        if self.store.should_compact():
            t0 = time.monotonic()
            core.maybe_compact()
            took = time.monotonic() - t0
            self.compact_loop_max = max(self.compact_loop_max, took)
            log.info("state compaction started at seq %d (%.1f ms on the loop)", core.state_seq, took * 1000)

    def run(self) -> None:
        try:
            run_until_stopped(self.step, self.stop_event, log)
        finally:
            self.close()

    def close(self) -> None:
        self.writer.stop()
        self.core.commit()
        self.store.close()
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
        budget_end = time.monotonic() + DRAIN_BUDGET  # decoding chunks is real work: let the loop tick
        for _ in range(100):
            if time.monotonic() > budget_end:
                return
            try:
                frame = self.peer_dealer.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = try_decode(frame, self.cfg.max_frame_bytes, "peer coordinator")
            t = self.transfer
            if t is None or self.core.role != STANDBY or getattr(msg, "req", None) != t.req:
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
                self.transfer = None  # _failover_rules asks again after request_timeout

    def _install(self, t: SnapshotReceiver, now: float) -> None:
        self.transfer = None
        t0 = time.monotonic()
        seq, term = install(self.core, t, now)
        gc.freeze()  # the replicated state is long-lived: keep the cyclic GC from walking it on every full pass
        took = time.monotonic() - t0
        self.core.synced = self.ever_synced = True
        pending, self.buffered = self.buffered, []
        for u in pending:
            self._on_state_update(u)
        log.info("standby synced: state seq %d (now %d), term %d, %d jobs, %d files; %.1f MB in %d chunks in "
                 "%.2fs (%d resumes), installed in %.2fs", seq, self.core.state_seq, term, len(self.core.jobs.jobs),
                 len(self.core.master.files), t.bytes / 1e6, t.have, now - t.started, t.resumes, took)

    def _fetch(self, indexes: list[int]) -> None:
        t = self.transfer
        if t is None or self.peer_dealer is None:
            return
        for i in indexes:
            try:
                self.peer_dealer.send(StateFetch(t.req, i, t.have).encode(), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                return  # not connected yet: the resume timer asks again

    def _request_snapshot(self, now: float) -> None:
        if self.peer_dealer is None:
            return
        self.transfer = SnapshotReceiver(next_req(), self.cfg.transfer_window, now, sink=self.core.master.apply_entries)
        self.snapshot_sent = now
        self.core.synced = False
        self.buffered = []
        try:
            self.peer_dealer.send(StateRequest(self.transfer.req).encode(), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.transfer = None
            return
        self._fetch(self.transfer.wanted())

    def _sync(self, now: float) -> None:
        """Standby with a live primary: start, resume or restart the snapshot transfer as needed."""
        t = self.transfer
        if t is None:
            if now - self.snapshot_sent > self.cfg.request_timeout:
                self._request_snapshot(now)
            return
        if now - t.last_progress > self.cfg.request_timeout:
            if t.resumes >= 3:
                log.warning("snapshot transfer %d stuck at chunk %d: starting over", t.req, t.have)
                self._request_snapshot(now)
            else:
                log.info("snapshot transfer %d: no chunk for %.1fs, resuming at chunk %d", t.req,
                         now - t.last_progress, t.have)
                self._fetch(t.resume(now))

    def _on_state_update(self, u: StateUpdate) -> None:
        if self.core.role != STANDBY:
            return
        if not self.core.synced:
            self.buffered.append(u)
            return
        if u.term > self.core.term:
            # A primary of a newer term (a restarted one continues its own stored history, whose
            # seq numbers may overlap ours): its snapshot, not a patch onto our copy.
            log.warning("state update of term %d (ours %d): re-syncing", u.term, self.core.term)
            self.core.term = u.term
            self._request_snapshot(time.monotonic())
            return
        if u.seq <= self.core.state_seq:
            return
        if u.seq != self.core.state_seq + 1:
            log.warning("state update gap (have %d, got %d): re-syncing", self.core.state_seq, u.seq)
            self._request_snapshot(time.monotonic())
            return
        self.core.apply_update(u.seq, u.term, u.op, u.data, time.monotonic())

    def _failover_rules(self, now: float) -> None:
        core = self.core
        peer_alive = self.peer_fd is not None and not self.peer_fd.failed(now)
        if core.role == PROBING:
            if peer_alive and self.peer_role == PRIMARY:
                core.role = STANDBY
                core.term = max(core.term, self.peer_term)
                log.info("peer %s is primary (term %d): starting as standby", self.peer, self.peer_term)
            elif now - self.started > self.cfg.failover_timeout:
                core.term = max(core.term, self.peer_term) + 1  # persisted before it is announced
                core.take_over(now)
                log.info("no primary heard: starting as primary (term %d)", core.term)
            return
        if core.role == PRIMARY:
            self.ever_synced = True  # it held the authoritative state: demoted, it may take over again
            if peer_alive and self.peer_role == PRIMARY and (
                self.peer_term > core.term or (self.peer_term == core.term and self.peer < self.addr)
            ):
                core.demote()
                core.term = self.peer_term
                self.core.synced = False  # our state is stale: take the new primary's snapshot
                self.transfer = None
            return
        # standby
        if peer_alive and self.peer_role == PRIMARY:
            if not self.core.synced:
                self._sync(now)
            return
        voted = now - core.last_vote < max(2 * self.cfg.failover_timeout, 2.0)
        if not peer_alive and voted and now - self.started > self.cfg.failover_timeout:
            if not self.ever_synced:
                # Never held the primary's state (the primary may still be loading its own): taking
                # over now would present an empty cluster and hand out job ids and versions again.
                if not self.refusal_logged:
                    self.refusal_logged = True
                    log.warning("not promoting: this standby never synced with a primary (start it without "
                                "--standby to let it start a cluster on its own state)")
                return
            if not self.core.synced:
                log.warning("promoting with the state of an unfinished re-sync (the primary died during it)")
            self.transfer = None
            self.buffered = []
            core.term = max(core.term, self.peer_term)
            t0 = time.monotonic()
            core.promote(now)
            log.info("promotion took %.0f ms", (time.monotonic() - t0) * 1000)
