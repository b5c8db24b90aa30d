"""Worker sessions and dispatch: who may get work, how much, and what comes back.

One :class:`WorkerSlot` per worker that announced itself (credit, the tasks it holds, its models),
beside the membership registry; :class:`Dispatcher` hands free slots a batch of the job the
scheduler picks (batch size, slow start, task deadlines) and takes each result in. Sessions are
the primary's alone: they are not replicated (a new primary starts them afresh as workers
re-attach); what a dispatch or result changes in the jobs goes through a state op.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.batching import TaskSizer
from broker.jobs import Job, TaskInfo, parse_answers
from broker.pool_keeper import PoolKeeper
from broker.scheduler import Candidate
from common.protocol import Bundle, Heartbeat, Ready, Rejoin, ResultAck, Task, TaskResult

if TYPE_CHECKING:
    from broker.coordinator import Coordinator

log = logging.getLogger("idunno.coordinator.dispatch")

MAX_ELAPSED = 86_400.0  # seconds of compute for one batch: anything longer is not a measurement
RESCAN = 1.0  # seconds between dispatch passes that check every worker (a safety net; see PassScan)
# Tasks any worker may hold, whatever they cost: one computing, one prefetched. Deeper (up to its
# credit) only for cheap measured ones (Dispatcher.eligible).
BASE_DEPTH = 2


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
    # A non-worker key spoke under this worker's routing id (ROUTER handover gave it the id): send
    # it nothing until the worker's own key is heard on that id again.
    hijacked: bool = False
    # Memory as the worker last reported it (Heartbeat/Ready; 0 / empty: not reported).
    rss_mb: int = 0
    peak_rss_mb: int = 0
    budget_mb: int = 0
    model_mb: dict[str, int] = field(default_factory=dict)

    @property
    def credit(self) -> int:
        return max(0, self.slots - len(self.outstanding)) if self.ready and not self.hijacked else 0


class PassScan:
    """Which workers a dispatch pass checks for a free slot.

    Checking every worker on every pass made dispatch O(workers) per result (2/3 of the CPU of
    1,000 simulated workers, tests/test_scale.py). A worker's eligibility changes only with its own
    tasks, slots and costs, so a pass checks the workers found eligible by the last pass and those
    touched since (any message from them, a task sent or taken back); and every worker once per
    RESCAN seconds, or after a client's command, in case a change reached none of those paths.
    """

    def __init__(self, slots: dict[str, WorkerSlot]) -> None:
        self.slots = slots  # the Dispatcher's, shared
        self.unsettled: set[str] = set()
        self.rescan_at = -math.inf
        self.order: dict[str, int] = {}  # worker -> its position in ``slots`` (the heap's tie-break)

    def touch(self, node: str) -> None:
        """Something about ``node`` changed: the next pass looks at it again. (Other senders, a
        pulse sidecar or a client, change no worker's slot by speaking: not a reason to scan all.)"""
        if node in self.slots:
            self.unsettled.add(node)

    def rescan(self) -> None:
        """The next pass looks at every worker: a change (a command, a takeover, a result that
        answers another worker's queries) may have made any of them eligible."""
        self.rescan_at = -math.inf

    def candidates(self, now: float) -> list[str]:
        """The workers to check, in ``slots`` order (as a full scan gave them)."""
        if now >= self.rescan_at or now < self.rescan_at - RESCAN:  # (or the clock went back)
            self.rescan_at = now + RESCAN
            self.order = {node: i for i, node in enumerate(self.slots)}
            return list(self.slots)
        nodes = [n for n in self.unsettled if n in self.slots]
        if len(self.order) != len(self.slots) or any(n not in self.order for n in nodes):
            self.order = {node: i for i, node in enumerate(self.slots)}
        return sorted(nodes, key=self.order.__getitem__)


class Dispatcher:
    def __init__(self, core: Coordinator) -> None:
        self.core = core
        self.cfg = core.cfg
        self.slots: dict[str, WorkerSlot] = {}
        self.model_mb: dict[str, int] = {}  # each model's size as the workers last reported it
        self.memory_seq = 0  # bumped when a budget or a model's size changes (the pools' sizing)
        self.pools = PoolKeeper(core)
        self.sizer = TaskSizer(core)
        # Final results taken in and not yet acknowledged, by the ROUTER identity they came from: the
        # next Task to that identity carries them (``Task.acks``), the rest go as ResultAcks when the
        # result's handling ends (``flush_acks``), so no ack waits longer than it did as a frame of its own.
        self.acks: dict[bytes, list[str]] = {}
        self.outgoing: dict[str, list[Task]] = {}  # the Tasks of the current pass, by worker
        self.deferred = False  # taking in a Bundle: its results share one dispatch pass at its end
        self.dispatch_wanted = False
        self.scan = PassScan(self.slots)

    @property
    def state(self) -> Any:
        return self.core.state

    def reset_sessions(self) -> None:
        """Forget every worker's session (a takeover: each re-attaches and announces its credit)."""
        self.slots.clear()
        self.scan.unsettled.clear()
        self.scan.rescan()

    def new_slot(self, inflight: Any, now: float) -> WorkerSlot:
        """A worker's session from its Join: the tasks it says it still holds occupy its slots."""
        return WorkerSlot(outstanding=dict.fromkeys(inflight, now))

    def report(self, slot: WorkerSlot, m: Heartbeat | Ready) -> None:
        """Take a worker's report of its loaded models and memory. Only what sizes the pools (its
        budget, the models' sizes) bumps ``memory_seq``; its RSS changes every heartbeat."""
        slot.models = tuple(m.models)
        if isinstance(m, Heartbeat):
            slot.rss_mb, slot.peak_rss_mb = max(0, m.rss_mb), max(0, m.peak_rss_mb)
        sizes = {k: v for k, v in m.model_mb.items() if v > 0}
        budget = max(0, m.budget_mb)
        changed = budget != slot.budget_mb
        before, slot.budget_mb, slot.model_mb = slot.model_mb, budget, sizes
        # A model's size is the largest any worker reports (a worker with two checkpoints of it
        # reports their sum), and only this model's own figures change it: workers reporting
        # different sizes of one model in turn must not bump memory_seq (and re-plan) every heartbeat.
        # O(1) per figure but when the worker that set the size reports it smaller (1,000 workers
        # heartbeat every second).
        for k, v in sizes.items():
            known = self.model_mb.get(k, 0)
            size = v if v > known else known
            if v < known and before.get(k) == known:
                size = max([v, *(s.model_mb.get(k, 0) for s in self.slots.values())])
            if size != known:
                self.model_mb[k] = size
                changed = True
        if changed:
            self.memory_seq += 1

    def task_gone(self, task: TaskInfo) -> None:
        """A task was re-queued (timeout, failed send, its worker gone): it no longer holds a slot,
        or a lost Task would hold it forever."""
        slot = self.slots.get(task.worker)
        if slot is not None:
            slot.outstanding.pop(task.task_id, None)
            self.scan.touch(task.worker)

    def eligible(self, node: str, slot: WorkerSlot, now: float) -> bool:
        """May ``node`` be given another task? Its credit (``worker_credit``) bounds how many tasks it
        holds, and their measured compute (``prefetch_lead``) what they add up to. Beyond
        ``BASE_DEPTH`` tasks, only while the worker turns its tasks around fast: every task it holds
        is of measured cost, they add up to at most ``cheap_queue_seconds`` of compute, and none has
        been out longer than that. The depth hides the round trip to us for cheap tasks (noop
        queries in Bundles of several); a new job's first task, or a task of a model still loading,
        never waits behind more than one other task's worth of work; and a worker starved of CPU
        (100 workers on 2 cores: 8 tasks each held a third of a 10 s window's queries in flight, and
        the jobs' live rates drifted 28 % apart) is not handed a queue it cannot turn around."""
        if slot.credit <= 0:
            return False
        seconds, unmeasured = queued_work(self.state, node, slot)
        if len(slot.outstanding) < BASE_DEPTH:
            return seconds <= self.cfg.prefetch_lead
        cheap = min(self.cfg.prefetch_lead, self.cfg.cheap_queue_seconds)
        return not unmeasured and seconds <= cheap and now - min(slot.outstanding.values()) <= cheap

    def dispatch(self, now: float) -> None:
        """Give every free worker slot a batch from the job the scheduler picks: the Tasks one pass
        gives a worker leave in one frame (a Bundle when there are several), the first carrying the
        worker's pending acks. While a Bundle of results is being taken in, the pass waits for its end."""
        if self.deferred:
            self.dispatch_wanted = True
            return
        try:
            self._dispatch_pass(now)
        finally:
            self._send_tasks(now)

    def _dispatch_pass(self, now: float) -> None:
        if not self.core.is_primary:
            return
        self.pools.refresh(now)
        if not self.state.jobs.backlogged():  # nothing to hand out: no worker need be checked (the
            return  # idle ones were, on every result at a run's tail)
        # The free slots are found once per pass, in a heap by credit (ties: registry order, as max()
        # gave): only the worker just given a task changes within the pass, so it alone is pushed back.
        # Re-scanning every worker per task made a pass O(workers^2): 1,000 simulated workers took
        # 10 s to fill their slots (tests/test_scale.py).
        free = [(-self.slots[node].credit, self.scan.order[node], node) for node in self.scan.candidates(now)
                if self.eligible(node, self.slots[node], now) and self.core.registry.is_alive(node)]
        self.scan.unsettled = {node for _, _, node in free}  # eligible now: still so next pass unless touched
        heapq.heapify(free)
        while free:
            backlog = self.state.jobs.backlogged()
            if not backlog:
                return
            _, order, node = heapq.heappop(free)
            # Model pools (broker/pools.py): the worker serves its pool's jobs while they have work.
            allowed = self.pools.serves(node, self.slots[node].models, backlog)
            among = None if allowed is None else {j.job_id for j in allowed}
            pick = self.state.scheduler.pick((Candidate(j.job_id, j.weight) for j in backlog), among)
            if pick is None:
                continue  # this worker waits (its pool's jobs are paced); the others may still serve
            job = self.state.jobs.jobs[pick.job_id]
            node, order = self._warm_node(job, node, order, free)
            if not self._send_task(job, node, now):
                continue  # not pushed back: for this pass only, a failed send is usually a reconnect
            if self.eligible(node, self.slots[node], now):
                heapq.heappush(free, (-self.slots[node].credit, order, node))

    def _warm_node(self, job: Job, node: str, order: int, free: list[tuple[int, int, str]]) -> tuple[str, int]:
        """Warm start: a job's first batch goes to a free worker that has its model loaded, if any
        (``node`` goes back into the heap in its place)."""
        if job.counts.sent or job.model in self.slots[node].models:
            return node, order
        for k, (_credit, other_order, other) in enumerate(free):
            if job.model in self.slots[other].models:
                free[k] = (-self.slots[node].credit, order, node)
                heapq.heapify(free)
                return other, other_order
        return node, order

    def _send_task(self, job: Job, node: str, now: float) -> bool:
        """Dispatch one batch of ``job`` to ``node``; its Task leaves at the end of the pass
        (``_send_tasks``, which re-queues it if the send fails). Always True."""
        n = self.sizer.slow_start(job, min(self.sizer.batch_for(job, node), len(job.pending)))
        indexes = list(itertools.islice(job.pending, n))
        task_id = self.state.jobs.next_task_id(job.job_id, self.core.term)
        self.core.emit("task.dispatch", {"task_id": task_id, "job_id": job.job_id, "worker": node,
                                         "indexes": indexes, "dispatched": self.core.clock()}, now)
        self.state.jobs.tasks[task_id].deadline = now + self.sizer.task_timeout(job, node, n)
        queries = self._queries(job, indexes, node)
        self.slots[node].outstanding[task_id] = now
        self.scan.touch(node)
        self.state.charge(task_id, job, n)
        # Sent at the end of the pass (_send_tasks), with the worker's other Tasks of this pass.
        self.outgoing.setdefault(node, []).append(Task(task_id, job.job_id, job.model, self.core.term, queries,
                                                       job.weights))
        return True

    def _send_tasks(self, now: float) -> None:
        """Send the Tasks of a pass, one frame per worker; the first carries the worker's acks."""
        outgoing, self.outgoing = self.outgoing, {}
        for node, tasks in outgoing.items():
            ident = node.encode()
            tasks[0].acks = self.acks.get(ident, [])
            if self.core.net.send(ident, tasks[0] if len(tasks) == 1 else Bundle.of(tasks)):
                self.acks.pop(ident, None)  # carried by the Task
                continue
            # Not sent (the acks stay pending: flush_acks sends them on their own, if it can).
            for task in tasks:
                log.warning("worker %s unreachable; task %s re-queued", node, task.task_id)
                self.core.emit("task.requeue", {"task_id": task.task_id}, now)

    def _queries(self, job: Job, indexes: list[int], node: str) -> list[dict[str, Any]]:
        """A Task's queries; an input the worker holds no replica of carries its replicas' locations
        (the master's table), so the worker reads it without a Locate request to us (issue #14)."""
        master = self.core.master
        live = master.live_nodes()
        queries = []
        for i in indexes:
            name, version = job.inputs[i]
            q: dict[str, Any] = {"index": i, "input": name, "version": version}
            source = master.source(name, version, node, live)
            if source is not None:
                q["source"] = source
            queries.append(q)
        return queries

    # ------------------------------------------------------------------------------------------
    # worker messages

    def on_ready(self, ident: bytes, m: Ready, now: float) -> None:
        if not self.core.registry.is_alive(m.node_id):
            self.core.net.send(ident, Rejoin("ready from a non-member"))
            return
        slot = self.slots.setdefault(m.node_id, WorkerSlot())
        slot.ready = True
        slot.slots = max(0, min(m.slots, 64))
        self.report(slot, m)
        self.dispatch(now)

    def on_result(self, ident: bytes, m: TaskResult, now: float) -> None:
        # Every result is acknowledged (also one then dropped): a streamed piece's ack at once, a
        # final one by the next Task to its worker if this handling sends one, else on its own.
        if m.final:
            self.acks.setdefault(ident, []).append(m.task_id)
        else:
            self.core.net.send(ident, ResultAck(m.task_id, False))
        try:
            self._take_result(ident, m, now)
        finally:
            if not self.deferred:
                self.flush_acks()

    def on_bundle(self, ident: bytes, m: Bundle, now: float, sender_role: str | None) -> None:
        """Several results from one worker (its own frame's parts, each checked like a frame of its
        own): one dispatch pass after all of them, so the Tasks it frees leave in one frame too."""
        if self.deferred:
            return  # never nested (Bundle.messages holds no Bundle); a guard, not a path
        self.deferred, self.dispatch_wanted = True, False
        try:
            for msg in m.messages:
                self.core.handle(ident, msg, now, sender_role)
        finally:
            self.deferred = False
        try:
            if self.dispatch_wanted:
                self.dispatch(now)
        finally:
            self.flush_acks()

    def flush_acks(self) -> None:
        """Send the acks no Task carried, each as a ResultAck."""
        acks, self.acks = self.acks, {}
        for ident, task_ids in acks.items():
            for task_id in task_ids:
                self.core.net.send(ident, ResultAck(task_id, True))

    def _take_result(self, ident: bytes, m: TaskResult, now: float) -> None:
        if not self.core.registry.is_alive(m.node_id):
            log.info("late result %s from %s (not a live member) dropped", m.task_id, m.node_id)
            return
        task = self.state.jobs.tasks.get(m.task_id)
        try:
            job, answers = check_result(self.state.jobs.jobs.get(m.job_id), m, task)
        except ValueError as exc:
            self.core.drop("bad_result", now, "result %.80s from %s dropped: %s", m.task_id, m.node_id, exc)
            return
        slot = self.slots.get(m.node_id)
        if slot is not None and m.final:
            slot.outstanding.pop(m.task_id, None)
        if task is None:
            self.scan.rescan()  # it may answer queries re-sent to another worker: that one may be free now
        if task is not None and not m.final:
            task.deadline = now + self.sizer.task_timeout(job, m.node_id)  # a streaming task is making progress
        self.core.emit("task.result", self._result_op(m, job, task, answers), now)
        self.dispatch(now)  # a slot is free, or the worker's queued work fell below the prefetch lead

    def _result_op(self, m: TaskResult, job: Job, task: TaskInfo | None, answers: dict[int, Any]) -> dict[str, Any]:
        """The ``task.result`` op of a checked result."""
        clock = self.core.clock()
        # A batch cannot have computed for longer than it has been out: the worker's figure feeds
        # the task timeouts (and the standby's copy of them), so it is held to what we saw.
        elapsed = min(m.elapsed, max(0.0, clock - task.dispatched)) if task is not None else m.elapsed
        dispatched = task.dispatched if task is not None else clock - elapsed
        latency = max(0.0, clock - dispatched)
        batch = len(task.indexes) if task is not None else len(answers)
        # Every answer goes into the op, answered before or not: JobTable.record is the one place that
        # accepts a result or counts it as a duplicate (on the standby too, from the same op). What
        # the job already knows (its model, each query's input) is not copied into the rows.
        results = {str(idx): {"top5": top5, "error": error, "worker": m.node_id, "batch": batch,
                              "completed_at": clock, "latency": latency}
                   for idx, (top5, error) in answers.items()}
        return {"task_id": m.task_id, "job_id": job.job_id, "results": results, "latency": latency,
                "elapsed": elapsed, "ts": clock, "worker": m.node_id, "final": m.final}

    def expire(self, now: float) -> None:
        """Re-queue tasks past their deadline; free slots held by tasks nobody knows."""
        for task in [t for t in self.state.jobs.tasks.values() if t.deadline < now]:
            log.warning("task %s on %s timed out; re-queued", task.task_id, task.worker)
            self.core.emit("task.requeue", {"task_id": task.task_id}, now)
        self._expire_unknown_outstanding(now)

    def _expire_unknown_outstanding(self, now: float) -> None:
        """Free slots held by task ids we have no task for (listed in a Join, answered elsewhere).

        Known tasks leave ``outstanding`` on their result or their timeout; an id this coordinator
        never dispatched would otherwise keep its slot until a result that may never come here.
        """
        for node, slot in self.slots.items():
            stale = [t for t, since in slot.outstanding.items()
                     if t not in self.state.jobs.tasks and now - since > self.cfg.task_timeout_min]
            for t in stale:
                log.warning("no result for %s from %s in %.0fs: freeing its slot", t, node, self.cfg.task_timeout_min)
                del slot.outstanding[t]
                self.scan.touch(node)


def check_result(job: Job | None, m: TaskResult, task: TaskInfo | None) -> tuple[Job, dict[int, Any]]:
    """A result must answer the task it names: its job, from its worker, for its queries, with a
    real duration. Raise ValueError otherwise. A task this coordinator does not hold (re-queued
    after a timeout, or dispatched by an earlier primary) may still answer its job's queries."""
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


def queued_work(state: Any, worker: str, slot: WorkerSlot) -> tuple[float, int]:
    """What a worker still has to do on the tasks it holds: the seconds of compute of their
    unanswered queries at its measured cost per image for each model, and how many of the tasks
    are of a model whose cost on this worker nothing has measured yet."""
    total, unmeasured = 0.0, 0
    for task_id in slot.outstanding:
        task = state.jobs.tasks.get(task_id)
        job = state.jobs.jobs.get(task.job_id) if task is not None else None
        if job is not None:
            cost = state.costs.measured(job.model, worker)
            if cost:
                total += cost * sum(1 for i in task.indexes if i not in job.results)
            else:
                unmeasured += 1
    return total, unmeasured
