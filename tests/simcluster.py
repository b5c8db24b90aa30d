"""An in-memory cluster for fast coordinator tests: a Net that serializes, simulated workers, virtual time.

Every message crosses the "wire" as bytes (encode on send, decode on delivery), so the tests
exercise the real protocol; time is virtual so a 60-second run takes milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

from broker.coordinator import Coordinator
from common.config import Config
from common.modelnames import MODEL_NAMES
from common.protocol import (
    Bundle,
    Command,
    Heartbeat,
    Join,
    Message,
    Ok,
    Ready,
    ResultAck,
    StateUpdate,
    StateUpdates,
    Task,
    TaskResult,
    Topic,
    decode,
)

# For tests of other mechanics that need a job's first task to be a whole batch, answered at once
# (no slow start, no streamed pieces).
WHOLE_BATCHES = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, slow_start=False,
                       stream_interval=0.0)


def state_updates(published: list[tuple[bytes, bytes]]) -> list[StateUpdate]:
    """Every op published on the STATE topic, one StateUpdate each (a frame may hold an iteration's ops)."""
    out: list[StateUpdate] = []
    for topic, raw in published:
        if topic == Topic.STATE:
            msg = decode(raw)
            out.extend(msg.updates() if isinstance(msg, StateUpdates) else [msg])
    return out


class MemoryNet:
    def __init__(self) -> None:
        self.outbox: list[tuple[bytes, bytes]] = []
        self.published: list[tuple[bytes, bytes]] = []

    def send(self, identity: bytes, msg: Message) -> bool:
        self.outbox.append((identity, msg.encode()))
        return True

    def publish(self, topic: bytes, msg: Message) -> None:
        self.published.append((topic, msg.encode()))

    def take(self) -> list[tuple[bytes, Message]]:
        """What was sent, a Bundle's parts one by one (as a worker handles them)."""
        out, self.outbox = self.outbox, []
        msgs = [(i, decode(b)) for i, b in out]
        return [(i, part) for i, m in msgs for part in (m.messages if isinstance(m, Bundle) else [m])]


@dataclass
class SimWorker:
    node_id: str
    speed: float = 1.0  # images/s multiplier
    busy_until: float = 0.0
    alive: bool = True
    received: list[Task] = field(default_factory=list)


@dataclass(order=True)
class _Event:
    t: float
    seq: int
    worker: str = field(compare=False)
    task: Task = field(compare=False)
    first: int = field(compare=False, default=0)  # the piece of the task's queries this event answers
    last: int = field(compare=False, default=0)
    elapsed: float = field(compare=False, default=0.0)  # the piece's compute time


class SimCluster:
    def __init__(self, costs: dict[str, float], speeds: list[float], cfg: Config | None = None,
                 budget_mb: int = 0, model_mb: dict[str, int] | None = None, jitter: float = 0.0,
                 seed: int = 0) -> None:
        self.t = 0.0
        # A loaded machine: each piece's compute time is multiplied by a log-normal factor of this
        # sigma (0: every image costs exactly its model's cost), from a seeded generator.
        self.jitter = jitter
        self.rng = random.Random(seed)
        # What every worker reports of its memory (Ready, Heartbeat): its budget and the sizes of
        # the models it has been sent tasks of (as a real worker's cache reports those it loaded).
        self.budget_mb = budget_mb
        self.model_mb = model_mb or {}
        self.cfg = cfg or Config(heartbeat_interval=1000.0, task_timeout_min=1e6)  # the shipped worker_credit
        self.net = MemoryNet()
        # The simulated models (any names) are accepted beside the real ones.
        self.core = Coordinator(self.cfg, "sim:1", self.net, clock=lambda: self.t, models=MODEL_NAMES | costs.keys())
        self.costs = costs  # seconds per image per model on a speed-1 worker
        self.workers: dict[str, SimWorker] = {}
        self.events: list[_Event] = []
        self.seq = itertools.count()
        self.dispatches: list[tuple[float, str, str, int]] = []  # (t, job, worker, n)
        self.replies: list[Message] = []
        self.acks: list[ResultAck] = []  # what workers were told about their results
        self.next_beat = 0.0
        for i, s in enumerate(speeds):
            self.add_worker(f"127.0.0.1:{9000 + i}@1", s)

    def deliver(self, ident: str, msg: Message) -> None:
        self.core.handle(ident.encode(), decode(msg.encode()), self.t)
        self._route()

    def add_worker(self, node_id: str, speed: float = 1.0) -> None:
        self.workers[node_id] = SimWorker(node_id, speed)
        self.deliver(node_id, Join(node_id, "worker", node_id.split("@")[0]))
        self.deliver(node_id, Ready(node_id, self.cfg.worker_credit, [], self.budget_mb))

    def add_inputs(self, prefix: str, n: int) -> None:
        for node in self.workers:  # fully replicated, so the master has no repair work to do
            self.core.master.node_report(node, [[f"{prefix}/img{i:05d}.jpg", 1, 100, "c" * 64] for i in range(n)])

    def command(self, name: str, **args: Any) -> Any:
        self.deliver("client", Command(1, name, args))
        reply = self.replies[-1]
        if not isinstance(reply, Ok):
            raise RuntimeError(getattr(reply, "message", reply))
        return reply.data

    def _route(self) -> None:
        # The server's loop publishes an iteration's ops at its commit; here each delivery is an
        # iteration, but the state store is committed only where a test (or a command) does.
        self.core.log.publish()
        for ident, msg in self.net.take():
            node = ident.decode()
            if node == "client":
                self.replies.append(msg)
            elif isinstance(msg, ResultAck):
                self.acks.append(msg)
            elif isinstance(msg, Task) and node in self.workers and self.workers[node].alive:
                self.acks.extend(ResultAck(t, True) for t in msg.acks)  # piggybacked on the Task
                w = self.workers[node]
                w.received.append(msg)
                self.dispatches.append((self.t, msg.job_id, node, len(msg.queries)))
                per_image = self.costs.get(msg.model, 0.01) / w.speed
                t = max(self.t, w.busy_until)
                # Like the real executor: results stream in pieces of about `stream_interval` of compute.
                interval = self.cfg.stream_interval
                size = len(msg.queries) if interval <= 0 else max(1, int(interval / per_image))
                for first in range(0, len(msg.queries), size):
                    last = min(len(msg.queries), first + size)
                    elapsed = (last - first) * per_image
                    if self.jitter:
                        elapsed *= self.rng.lognormvariate(0.0, self.jitter)
                    t += elapsed
                    heapq.heappush(self.events, _Event(t, next(self.seq), node, msg, first, last, elapsed))
                w.busy_until = t

    def _beat(self) -> None:
        # Alive workers heartbeat every interval of virtual time; dead ones fall silent.
        while self.next_beat <= self.t:
            for w in self.workers.values():
                if w.alive:
                    self.core.handle(w.node_id.encode(), decode(self._heartbeat(w).encode()), self.next_beat)
            self.core.tick(self.next_beat)
            self.next_beat += self.cfg.heartbeat_interval
        self._route()

    def _heartbeat(self, w: SimWorker) -> Heartbeat:
        # Loaded models only where the test gives sizes: the other sims' workers report none.
        models = sorted({t.model for t in w.received}) if self.model_mb else []
        sizes = {m: self.model_mb[m] for m in models if m in self.model_mb}
        return Heartbeat(w.node_id, 0, models, rss_mb=100 + sum(sizes.values()), budget_mb=self.budget_mb,
                         model_mb=sizes)

    def run_until(self, t_end: float) -> None:
        while True:
            next_event = self.events[0].t if self.events else float("inf")
            if self.next_beat <= min(next_event, t_end):
                # Heartbeats and ticks go on between events too: a failure detected after the last
                # result re-queues work that must then still run before t_end.
                self.t = self.next_beat
                self._beat()
                continue
            if next_event > t_end:
                break
            ev = heapq.heappop(self.events)
            self.t = ev.t
            self._beat()
            w = self.workers[ev.worker]
            if not w.alive:
                continue
            piece = ev.task.queries[ev.first:ev.last]
            results = [[q["index"], [["x", 1.0]], None] for q in piece]
            final = ev.last >= len(ev.task.queries)
            self.deliver(ev.worker, TaskResult(ev.task.task_id, ev.task.job_id, ev.worker, ev.elapsed, results, final))
            self.core.tick(self.t)
            self._route()
        self.t = t_end
        self._beat()
        self.core.tick(self.t)
        self._route()

    def kill(self, node_id: str) -> None:
        self.workers[node_id].alive = False

    def rate(self, job_id: str, t0: float, t1: float) -> float:
        return self.core.jobs.jobs[job_id].stats.images_between(t0, t1) / (t1 - t0)
