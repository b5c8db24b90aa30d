"""The coordinator daemon: sockets, the one loop, standby replication and Binary Star failover.

Sockets (port P = the control port of ``addr``):
  P     ROUTER  workers and clients (DEALER) — requests, worker protocol, commands
  P+1   PUB     heartbeats, membership view, log stream, state updates for the standby
  P+2   PULL    log records pushed by every node, republished on PUB
and, when a peer coordinator is configured, a SUB to the peer's PUB and a DEALER to its ROUTER.

Failover (zguide Binary Star) is the state machine of common/failover.py, driven once per step by
``broker/standby.py: Failover``: a standby promotes itself only when the primary has been silent for
``failover_timeout`` *and* a worker has asked it for service in that time (a standby cut off from
everyone stays standby). Each promotion raises the term; a primary that hears a primary with a
higher term demotes itself to standby and re-syncs, and workers ignore older terms.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from broker.coordinator import Coordinator
from broker.jobs import Job
from broker.standby import Failover, PeerLink
from broker.state_store import StateStore
from common import security
from common.config import Config
from common.failover import PRIMARY, STANDBY
from common.failure_detector import LOCAL_STALL
from common.logstream import LOG_PORT_OFFSET, MAX_LOG_FRAME, PUB_PORT_OFFSET
from common.loop import run_until_stopped
from common.protocol import LogRecord, Message, Topic
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
        self.queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
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
        # The model once for the file (rows no longer repeat it; the results file still names it).
        self.queue.put((job.job_id, {"job": job.job_id, "model": job.model, "results": job.rows()}))

    def run(self) -> None:
        from sdfs.client import SdfsClient  # noqa: PLC0415 - only this thread needs a client

        client = SdfsClient(self.cfg, [self.addr], zmq.Context.instance())
        try:
            while (item := self.queue.get()) is not None:
                job_id, doc = item
                try:
                    self._write(client, job_id, doc)
                finally:
                    with self.lock:
                        self.owed.discard(job_id)
        finally:
            client.close()

    def _write(self, client: Any, job_id: str, doc: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix="results-", suffix=".json", dir=self.spool)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh)
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


def bind_sockets(ctx: zmq.Context, cfg: Config, addr: str) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket]:
    """The ROUTER, XPUB and PULL sockets of a coordinator at ``addr`` (see the module docstring)."""
    router = make_socket(ctx, zmq.ROUTER, cfg.max_frame_bytes, server=True)
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker with the same id takes over
    router.bind(tcp(addr))
    # XPUB with manual subscriptions: the state journal (Topic.STATE) goes to coordinator keys only.
    pub = make_socket(ctx, zmq.XPUB, cfg.max_frame_bytes, server=True)
    pub.setsockopt(zmq.XPUB_MANUAL, 1)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    pub.bind(tcp(offset_addr(addr, PUB_PORT_OFFSET)))
    # Only coordinator and worker keys may push log records (ZAP domain NODES).
    pull = make_socket(ctx, zmq.PULL, min(cfg.max_frame_bytes, MAX_LOG_FRAME), server=True, domain=security.NODES)
    pull.bind(tcp(offset_addr(addr, LOG_PORT_OFFSET)))
    return router, pub, pull


class TermFile:
    """The coordinator's current term on disk (Raft's persisted currentTerm)."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.path = data_dir / "term"

    def load(self) -> int:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return 0

    def save(self, term: int) -> None:
        """Persist a new term before it is announced (the Coordinator's term setter calls this):
        written to a temporary file, fsync'd, renamed over ``term``, directory fsync'd, so a
        crash or power loss leaves the old or the new number, never none."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(str(term))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class LogLimiter:
    """Token bucket per log sender: a flood of records from one node costs the others nothing."""

    def __init__(self, on_drop: Callable[[float, str], None]) -> None:
        self.buckets: dict[tuple[str, str], list[float]] = {}  # sender -> [tokens, last refill]
        self.on_drop = on_drop

    def allowed(self, sender: tuple[str, str]) -> bool:
        now = time.monotonic()
        bucket = self.buckets.get(sender)
        if bucket is None:
            if len(self.buckets) >= MAX_LOG_SENDERS:
                sender = (sender[0], "*")  # names made up by the thousand share one bucket
                bucket = self.buckets.get(sender)
            if bucket is None:
                bucket = self.buckets[sender] = [LOG_BURST, now]
        bucket[0] = min(LOG_BURST, bucket[0] + (now - bucket[1]) * LOG_RATE)
        bucket[1] = now
        if bucket[0] < 1.0:
            self.on_drop(now, sender[1])
            return False
        bucket[0] -= 1.0
        return True


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
        self.addr = addr
        self.peer = peer or None
        self.data_dir = Path(data_dir or Path(cfg.data_dir) / f"coordinator-{host_port(addr)[1]}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.router, self.pub, self.pull = bind_sockets(self.ctx, cfg, addr)
        self.net = ZmqNet(self.router, self.pub)
        self.writer = ResultWriter(cfg, addr, self.data_dir / "spool")
        self.store = StateStore(self.data_dir / "state.sqlite", chunk_bytes=cfg.chunk_bytes,
                                compact_ops=cfg.state_compact_ops)
        self.term_file = TermFile(self.data_dir)
        # Restored before serving, as a non-primary (replaying a finished job must not write its
        # results yet); the role is taken afterwards, with a term above any stored or restored.
        self.core = Coordinator(
            cfg, addr, self.net, role=STANDBY, term=self.term_file.load(),
            db_path=str(self.data_dir / "metadata.sqlite"), scheduler=scheduler, on_job_done=self.writer.submit,
            store=self.store, persist_term=self.term_file.save,
            grant_key=security.CURRENT.grant_key if security.CURRENT else None,
        )
        t0 = time.monotonic()
        restored = self.core.load_state(t0)
        if restored["jobs"]:
            log.info("state restored in %.2fs", time.monotonic() - t0)
        self.link = PeerLink(self.ctx, cfg, self.peer) if self.peer else None
        self.failover = Failover(cfg, self.core, addr, self.link)
        self.failover.start(standby, time.monotonic())
        gc.freeze()  # the state loaded from disk is long-lived: full GC passes need not walk it (loop stalls)
        self.started = self.last_expiry = self.last_step = time.monotonic()
        self.failover.started = self.started
        self.poller = zmq.Poller()
        peer_socks = (self.link.sub, self.link.dealer) if self.link else ()
        for s in (self.router, self.pull, *peer_socks, self.pub):
            self.poller.register(s, zmq.POLLIN)
        self.stop_event = threading.Event()
        self.metrics: dict | None = None  # refreshed by the loop for the Prometheus thread
        self.next_metrics = 0.0
        self.compact_loop_max = 0.0  # longest time a compaction held the loop (seconds)
        self.commit_due: float | None = None  # group commit of the queued state ops (see _durability)
        self.log_limiter = LogLimiter(lambda now, node: self.core.drop(
            "log_rate", now, "log records from %r over %.0f/s dropped", node[:80], LOG_RATE))
        log.info("coordinator %s up as %s (term %d, peer %s)", addr, self.core.role, self.core.term,
                 self.peer or "none")

    # -- loop -----------------------------------------------------------------------------------
    def _stalled(self, gap: float) -> None:
        self.core.loop_stalled(gap)
        if gap > LOCAL_STALL and self.link is not None:
            self.link.excuse(gap)  # our own stall is not the peer's silence

    def poll_timeout(self, now: float) -> float:
        """Seconds the loop may wait for a message: until the nearest deadline (timers, the group
        commit), at most 0.1 s."""
        deadline = self.core.next_deadline(now)
        if self.commit_due is not None:
            deadline = min(deadline, self.commit_due)
        return max(0.0, min(0.1, deadline - now))

    def step(self, now: float) -> None:
        self._stalled(now - self.last_step)
        self.last_step = now
        timeout = self.poll_timeout(now)
        backlog = False
        # Membership and control traffic first: the ROUTER (heartbeats, results, requests) and the
        # peer's heartbeats, then bulk log records. Each drain is bounded, so no socket starves another.
        ready = dict(self.poller.poll(int(timeout * 1000)))
        link, sync = self.link, self.failover.sync
        if link is not None and sync is not None and link.sub in ready:
            link.drain_sub(sync.on_update)
        if self.router in ready:
            backlog = self._drain_router()
        if link is not None and sync is not None and link.dealer in ready:
            sync.drain()
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
        self.failover.step(now)  # the Binary Star rules: common/failover.py's COORDINATOR_TABLE
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
        """Once per iteration: publish this iteration's ops to the standby, commit the queued ops
        once the oldest has waited ``state_commit_interval`` (group commit), record results files
        written, and start a compaction when the journal has grown past the threshold."""
        core = self.core
        self.writer.active = core.role == PRIMARY
        for job_id, version in self.writer.written():
            if not core.results_written(job_id, version, now):
                log.warning("results/%s v%d written but not recorded (not primary, or written before): "
                            "an extra version of the same results", job_id, version)
        # A transaction per iteration was a quarter of the loop's busy time at 3,600 noop queries/s
        # (a thousand iterations a second, each with a few ops; issue #14). The ops waiting are never
        # ones a client was told about (a command commits before its answer, Control.on_command):
        # dispatches and results, run again if the process dies before their commit.
        if self.commit_due is None and self.store.rows:
            self.commit_due = now + self.cfg.state_commit_interval
        if self.commit_due is not None and now >= self.commit_due:
            self.commit_due = None
            core.commit()
        else:
            core.log.publish()  # the standby hears every iteration's ops at once
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
        # IDUNNO_PROFILE=<path>: profile the loop (cProfile) and dump its stats to <path>.<pid> on
        # exit, to see where a query's time goes in the coordinator (bench/README.md, issue #14).
        profile_to = os.environ.get("IDUNNO_PROFILE")
        profiler = None
        if profile_to:
            import cProfile  # noqa: PLC0415 - only when asked for

            profiler = cProfile.Profile()
            profiler.enable()
        try:
            run_until_stopped(self.step, self.stop_event, log)
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(f"{profile_to}.{os.getpid()}")
            self.close()

    def close(self) -> None:
        self.writer.stop()
        self.core.commit()
        self.store.close()
        for s in (self.router, self.pub, self.pull):
            s.close(0)
        if self.link is not None:
            self.link.close()

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
            if isinstance(msg, LogRecord) and self.log_limiter.allowed((security.role_of(frame) or "",
                                                                        msg.node[:200])):
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
