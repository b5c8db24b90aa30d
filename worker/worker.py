"""The worker daemon: membership, SDFS storage, and inference tasks from the primary coordinator.

One loop (``step``) owns every socket: a DEALER per coordinator (identity = node id), a SUB to
every coordinator's PUB, and an inproc PULL where the executor and the replication thread hand
back finished work. Heavy work never runs here, so heartbeats flow while torch computes.

Coordinator selection: the worker follows the primary with the highest term it hears on PUB. When
the primary is silent for the failure timeout it asks every other coordinator for service (its
Join is the standby's vote, Binary Star) and re-attaches to whichever answers as primary, handing
over the results it could not deliver and the tasks it still holds.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import zmq

from common.config import Config
from common.failure_detector import LOCAL_STALL, DetectorParams, PhiAccrual
from common.identity import default_node_name, make_node_id, new_incarnation, validate_node_name
from common.logstream import PUB_PORT_OFFSET
from common.loop import run_until_stopped
from common.membership import ViewTracker
from common.protocol import (
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
    Topic,
    ViewRequest,
    ViewSnapshot,
    ViewUpdate,
    Welcome,
)
from common.rpc import next_req
from common.transport import make_socket, offset_addr, tcp, try_decode
from sdfs.client import SdfsClient
from sdfs.server import StorageServer
from sdfs.store import LocalStore
from worker.executor import Executor
from worker.pulse import PulseFile

log = logging.getLogger("idunno.worker")

REPLICATION_THREADS = 4


@dataclass
class CoordinatorInfo:
    addr: str
    role: str = ""
    term: int = 0
    detector: PhiAccrual | None = None  # None until first heard

    def heard(self, now: float, params: DetectorParams) -> None:
        if self.detector is None:
            self.detector = PhiAccrual(params, now)
        else:
            self.detector.heartbeat(now)

    def alive(self, now: float) -> bool:
        return self.detector is not None and not self.detector.failed(now)


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
        self.coords = {a: CoordinatorInfo(a) for a in cfg.coordinators}
        self.fd_params = cfg.detector_params()
        self.last_tick = time.monotonic()
        self.primary: str | None = None
        self.term = 0
        self.joined = False
        self.generation = 0  # bumps on every new incarnation: older executor output is discarded
        self.links: dict[str, zmq.Socket] = {}
        self.sub = make_socket(self.ctx, zmq.SUB, cfg.max_frame_bytes)
        for topic in (Topic.HEARTBEAT, Topic.VIEW):
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        for a in self.coords:
            self.sub.connect(tcp(offset_addr(a, PUB_PORT_OFFSET)))
        self.inbox_endpoint = f"inproc://worker-{uuid.uuid4().hex}"
        self.inbox = make_socket(self.ctx, zmq.PULL, cfg.max_frame_bytes, secure=False)
        self.inbox.bind(self.inbox_endpoint)
        self.view = ViewTracker()
        self.view_req: int | None = None
        self.inflight: dict[str, Task] = {}
        self.unacked: dict[str, TaskResult] = {}
        self.held_reports: list[Stored] = []  # re-replication reports made while detached
        self.stale = 0  # tasks of an earlier incarnation the executor is still finishing
        self.next_heartbeat = 0.0
        self.next_join = 0.0
        self.executor = Executor(
            cfg, lambda: self.node_id, self.store, self.data_dir / "cache", lambda: list(self.coords),
            self.inbox_endpoint, self.ctx, host_workers_fn=self._workers_on_host,
        )
        self.replications: queue.Queue[Replicate | None] = queue.Queue()
        # A few pullers, so one slow or dead source does not hold up every other repair.
        self.repl_threads = [
            threading.Thread(target=self._replication_loop, name=f"replicate-{i}", daemon=True)
            for i in range(REPLICATION_THREADS)
        ]
        self.handlers: dict[type[Message], callable] = {
            Welcome: self.on_welcome,
            Rejoin: self.on_rejoin,
            Task: self.on_task,
            ResultAck: self.on_result_ack,
            Replicate: self.on_replicate,
            Drop: self.on_drop,
            Error: self.on_error,
            ViewSnapshot: self.on_view_snapshot,
            Preload: self.on_preload,
        }
        self.stop_event = threading.Event()
        self.pulse_file: PulseFile | None = None
        self.pulse_proc: subprocess.Popen | None = None
        self._rebuild_poller()

    # -- sockets ----------------------------------------------------------------------------------
    def _link(self, addr: str) -> zmq.Socket:
        sock = self.links.get(addr)
        if sock is None:
            sock = make_socket(self.ctx, zmq.DEALER, self.cfg.max_frame_bytes, identity=self.node_id.encode())
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.connect(tcp(addr))
            self.links[addr] = sock
            self._rebuild_poller()
        return sock

    def _rebuild_poller(self) -> None:
        self.poller = zmq.Poller()
        for s in (self.sub, self.inbox, *self.links.values()):
            self.poller.register(s, zmq.POLLIN)

    def _send(self, addr: str | None, msg: Message) -> bool:
        if addr is None:
            return False
        try:
            self._link(addr).send(msg.encode(), flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.debug("send %s to %s failed: %s", msg.TYPE, addr, exc)
            return False

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
        self._start_pulse()
        self.executor.start()
        for t in self.repl_threads:
            t.start()
        log.info("worker %s up (data %s), coordinators %s", self.node_id, self.storage.addr, ", ".join(self.coords))

    def _start_pulse(self) -> None:
        """Start the pulse sidecar (worker/pulse.py): liveness that GIL contention here cannot delay."""
        self.pulse_file = PulseFile(self.data_dir / "pulse.mmap", self.node_id)
        self.pulse_proc = subprocess.Popen(
            [sys.executable, "-m", "worker.pulse", str(os.getpid()), str(self.pulse_file.path)],
            stdin=subprocess.DEVNULL, env={**os.environ, **self.cfg.env()},
        )

    def _stop_pulse(self) -> None:
        if self.pulse_proc is not None:
            self.pulse_proc.terminate()
            try:
                self.pulse_proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.pulse_proc.kill()
                self.pulse_proc.wait(timeout=2)
            self.pulse_proc = None
        if self.pulse_file is not None:
            self.pulse_file.close()
            self.pulse_file = None

    def run(self) -> None:
        self.start()
        try:
            run_until_stopped(self.step, self.stop_event, log)
        finally:
            self.shutdown()

    def shutdown(self, leave: bool = True) -> None:
        if leave and self.joined:
            self._send(self.primary, Leave(self.node_id))
            time.sleep(0.05)  # shutdown path only: let the Leave reach the wire before LINGER=0 closes
        self._stop_pulse()
        self.executor.stop()
        for _ in self.repl_threads:
            self.replications.put(None)
        self.storage.stop()
        for s in (self.sub, self.inbox, *self.links.values()):
            s.close(0)

    # -- loop -------------------------------------------------------------------------------------
    def step(self, now: float) -> None:
        timeout = max(0.0, min(self.next_heartbeat, self.next_join if not self.joined else 1e18) - now)
        for sock, _ in self.poller.poll(int(min(timeout, 0.1) * 1000)):
            if sock is self.sub:
                self._drain_sub()
            elif sock is self.inbox:
                self._drain_inbox()
            elif not sock.closed:  # a Rejoin handled just now may have replaced the links
                self._drain_link(sock)
        self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        if now - self.last_tick > LOCAL_STALL:
            # This process was starved or frozen: the coordinators' heartbeats waiting in our socket
            # are not late, we are. Do not fail over because of our own stall.
            for c in self.coords.values():
                if c.detector is not None:
                    c.detector.excuse(now - self.last_tick)
        self.last_tick = now
        if self.pulse_file is not None:
            self.pulse_file.tick(now)
        self._choose_primary(now)
        if not self.joined and now >= self.next_join:
            self.next_join = now + self.cfg.heartbeat_interval
            targets = [self.primary] if self.primary else list(self.coords)
            for addr in targets:
                self._send(addr, self._join_msg())
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.cfg.heartbeat_interval
            if self.joined:
                self._send(self.primary, Heartbeat(self.node_id, len(self.inflight), list(self.executor.loaded)))
        if self.joined and self.view_req is None and not self.view.synced:
            self.view_req = next_req()
            self._send(self.primary, ViewRequest(self.view_req))

    def _join_msg(self) -> Join:
        return Join(
            self.node_id, "worker", self.storage.addr,
            store=[i.as_list() for i in self.store.list()],
            # Tasks still computing and tasks finished but not yet acknowledged: the coordinator keeps
            # them out of the queue (their results follow the Welcome) instead of running them twice.
            inflight=list(dict.fromkeys([*self.inflight, *self.unacked])),
        )

    def _choose_primary(self, now: float) -> None:
        alive = [c for c in self.coords.values() if c.alive(now)]
        primaries = [c for c in alive if c.role == "primary" and c.term >= self.term]
        best = max(primaries, key=lambda c: c.term, default=None)
        if best is not None and best.addr != self.primary:
            log.info("following primary coordinator %s (term %d)", best.addr, best.term)
            self.primary = best.addr
            self.term = best.term
            self.joined = False
            self.next_join = now
            self.view = ViewTracker()
            self.view_req = None
        elif best is None and self.primary is not None and self.joined:
            c = self.coords.get(self.primary)
            if c is None or not c.alive(now):
                log.warning("primary coordinator %s is silent; asking the others", self.primary)
                self.primary = None
                self.joined = False
                self.next_join = now

    def _drain_sub(self) -> None:
        for _ in range(1000):
            try:
                frames = self.sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            msg = try_decode(frames[1], self.cfg.max_frame_bytes, "coordinator PUB")
            if isinstance(msg, CoordinatorHeartbeat):
                c = self.coords.get(msg.addr)
                if c is not None:
                    c.role, c.term = msg.role, msg.term
                    c.heard(time.monotonic(), self.fd_params)
            elif isinstance(msg, ViewUpdate) and not self.view.update(msg.seq, msg.event, msg.member):
                log.info("membership view gap detected; re-syncing")
                self.view_req = None

    def _addr_of(self, sock: zmq.Socket) -> str | None:
        return next((a for a, s in self.links.items() if s is sock), None)

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
            if handler is None:
                log.warning("unexpected %s from coordinator ignored", msg.TYPE)
                continue
            sender = self._addr_of(sock)
            if isinstance(msg, Welcome):
                if sender is not None and msg.term >= self.term:
                    # A Welcome is proof of life of a primary: follow it right away (after a takeover,
                    # or before its first heartbeat reached our SUB) instead of waiting for a heartbeat.
                    info = self.coords.get(sender)
                    if info is not None:
                        info.role, info.term = "primary", msg.term
                        info.heard(time.monotonic(), self.fd_params)
                    self.primary = sender
            elif sender != self.primary and not isinstance(msg, Error):
                # Only the primary we follow may command us: a resumed old primary (SIGSTOP, long GC
                # pause) must not make us rejoin, run its tasks or drop replicas.
                log.info("ignored %s from %s, which is not our primary", msg.TYPE, sender)
                continue
            try:
                handler(msg)
            except Exception:
                log.exception("handler for %s failed", msg.TYPE)
            if sock.closed:
                return

    def _drain_inbox(self) -> None:
        for _ in range(256):
            try:
                gen, frame = self.inbox.recv_multipart(flags=zmq.NOBLOCK)
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
                            self._send(self.primary, self._ready())
                    continue
                self._keep_unacked(msg)
                if self.joined:
                    self._send(self.primary, msg)
            elif isinstance(msg, Stored):
                msg.node_id = self.node_id
                if self.joined:
                    self._send(self.primary, msg)
                else:
                    self.held_reports.append(msg)  # delivered once we are attached again

    def _keep_unacked(self, piece: TaskResult) -> None:
        """Everything a task has answered so far, until the coordinator acknowledges its final piece:
        after a takeover the new primary gets it in one message (it de-duplicates by query)."""
        kept = self.unacked.get(piece.task_id)
        if kept is None:
            self.unacked[piece.task_id] = TaskResult(piece.task_id, piece.job_id, piece.node_id, piece.elapsed,
                                                     list(piece.results), piece.final)
            return
        kept.results.extend(piece.results)
        kept.elapsed += piece.elapsed
        kept.final = piece.final

    # -- handlers ---------------------------------------------------------------------------------
    def on_welcome(self, m: Welcome) -> None:
        if m.node_id != self.node_id or m.term < self.term or self.primary is None:
            return
        if not self.joined:
            log.info("joined coordinator %s (term %d)", self.primary, m.term)
        self.joined = True
        self.term = m.term
        # Results no coordinator acknowledged yet (a takeover happened) go first, then the credit:
        # the coordinator de-duplicates by query, and Ready sets the credit absolutely afterwards.
        for r in self.unacked.values():
            self._send(self.primary, r)
        for report in self.held_reports:
            self._send(self.primary, report)
        self.held_reports.clear()
        self._send(self.primary, self._ready())

    def _ready(self) -> Ready:
        return Ready(self.node_id, max(0, self.cfg.worker_credit - self.stale), list(self.executor.loaded))

    def on_rejoin(self, m: Rejoin) -> None:
        log.warning("coordinator asks for a rejoin (%s): starting a new incarnation", m.reason)
        for s in self.links.values():
            s.close(0)
        self.links = {}
        self._rebuild_poller()
        self.node_id = make_node_id(self.name, new_incarnation())
        if self.pulse_file is not None:
            self.pulse_file.set_node(self.node_id)
        self.generation += 1
        self.stale += len(self.inflight)  # still in the executor: they take slots until they finish
        self.inflight.clear()
        self.unacked.clear()
        self.joined = False
        self.next_join = 0.0

    def on_task(self, m: Task) -> None:
        if m.term < self.term or not self.joined:
            log.warning("task %s from an old term (%d < %d) ignored", m.task_id, m.term, self.term)
            return
        if m.task_id in self.inflight or m.task_id in self.unacked:
            return  # duplicate delivery
        if len(self.inflight) + self.stale >= self.cfg.worker_credit:
            # Still run it (the query must not be lost), but this is a flow-control bug worth seeing.
            log.warning("task %s arrived beyond the %d slots this worker offers", m.task_id, self.cfg.worker_credit)
        self.inflight[m.task_id] = m
        self.executor.submit(m, self.generation)

    def on_result_ack(self, m: ResultAck) -> None:
        if m.final:
            self.unacked.pop(m.task_id, None)

    def on_preload(self, m: Preload) -> None:
        log.info("preloading %s%s (a job was submitted)", m.model, f" with {m.weights}" if m.weights else "")
        self.executor.preload(m.model, m.weights)  # loads off this loop (worker/executor.py)

    def _workers_on_host(self) -> int:
        """Workers on this machine (by the membership view): they share its memory for models."""
        host = self.storage.addr.rsplit(":", 1)[0]
        members = list(self.view.members.values())  # one copy: the executor's thread asks, the loop updates
        return max(1, sum(1 for m in members if m.state == "alive" and m.role == "worker"
                          and m.data_addr.rsplit(":", 1)[0] == host))

    def on_replicate(self, m: Replicate) -> None:
        self.replications.put(m)

    def on_drop(self, m: Drop) -> None:
        n = self.store.drop(m.name, m.version)
        log.info("dropped %d replica(s) of %s%s", n, m.name, f" v{m.version}" if m.version else "")

    def on_error(self, m: Error) -> None:
        if m.code == ErrorCode.NOT_PRIMARY:
            return  # the standby refused: the Join still counted as a vote; keep trying
        log.warning("coordinator error: %s", m.message)

    def on_view_snapshot(self, m: ViewSnapshot) -> None:
        if m.req == self.view_req:
            self.view.load_snapshot(m.seq, m.members)
            if not self.view.synced:  # a buffered update showed a gap: ask again
                self.view_req = None

    # -- re-replication (own thread, own sockets) -----------------------------------------------
    def _replication_loop(self) -> None:
        client = SdfsClient(self.cfg, list(self.coords), self.ctx)
        out = make_socket(self.ctx, zmq.PUSH, self.cfg.max_frame_bytes, secure=False)
        out.connect(self.inbox_endpoint)
        try:
            while (m := self.replications.get()) is not None:
                try:
                    if not self.store.has(m.name, m.version):
                        client.pull_replica(m.sources, m.name, m.version, m.size, m.checksum, self.store)
                    reply = Stored(self.node_id, m.name, m.version, m.size, m.checksum)
                except Exception as exc:
                    log.warning("re-replication of %s v%d failed: %s", m.name, m.version, exc)
                    reply = Stored(self.node_id, m.name, m.version, m.size, m.checksum, ok=False, error=str(exc))
                out.send_multipart([str(self.generation).encode(), reply.encode()])
        finally:
            client.close()
            out.close(0)

