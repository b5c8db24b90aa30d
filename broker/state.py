"""The coordinator's replicated state: the only thing a state op changes.

Jobs and their task table, the scheduler's accounting, the cost measurements, the timeline and
the membership/SDFS entries that ops carry. The primary applies an op here and journals it; the
standby applies the same op from the primary's stream (zguide Clone: snapshot + sequenced
updates), so both run one code path.

Snapshot, durable items and restore are all derived from one table of parts (:meth:`parts`), so a
new replicated field is added in one place and cannot be forgotten by one of the three.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from broker.jobs import Job, JobState, JobTable, TaskInfo
from broker.scheduler import make_scheduler
from common.config import Config
from common.membership import MemberRegistry
from sdfs.master import SdfsMaster

log = logging.getLogger("idunno.coordinator.state")

MAX_EVENTS = 1000  # timeline entries kept (and replicated)
EWMA = 0.2  # weight of a new measurement in the cost averages


class CostTable:
    """Measured seconds per image, per model and worker (EWMA): the one record of cost.

    A model's cluster-wide cost is derived from it (the mean over the workers that ran the model),
    and so is a worker's cost over all models, never kept beside it.
    """

    def __init__(self) -> None:
        self.by_model: dict[str, dict[str, float]] = {}
        self._sums: dict[str, float] = {}  # per model, the sum of its workers' figures (the mean in O(1))

    def observe(self, model: str, worker: str, per_image: float) -> None:
        costs = self.by_model.setdefault(model, {})
        old = costs.get(worker)
        new = costs[worker] = per_image if old is None else (1 - EWMA) * old + EWMA * per_image
        self._sums[model] = self._sums.get(model, 0.0) + new - (old or 0.0)

    def of(self, model: str, worker: str | None = None) -> float:
        """The worker's cost for the model if measured, else the model's over the cluster (0: none yet)."""
        costs = self.by_model.get(model)
        if not costs:
            return 0.0
        if worker is not None and worker in costs:
            return costs[worker]
        return self._sums[model] / len(costs)

    def measured(self, model: str, worker: str) -> float:
        """The worker's own cost for the model (0 while it has not run it)."""
        return self.by_model.get(model, {}).get(worker, 0.0)

    def of_worker(self, worker: str) -> float:
        mine = [c[worker] for c in self.by_model.values() if worker in c]
        return sum(mine) / len(mine) if mine else 0.0

    def per_model(self) -> dict[str, float]:
        return {m: self.of(m) for m in self.by_model}

    def dump(self) -> dict[str, dict[str, float]]:
        return {m: dict(c) for m, c in self.by_model.items()}

    def load(self, value: dict[str, Any]) -> None:
        # An older snapshot kept one figure per model: it becomes the model's (workerless) figure.
        self.by_model = {str(m): ({str(w): float(x) for w, x in c.items()} if isinstance(c, dict) else {"": float(c)})
                         for m, c in (value or {}).items()}
        self._sums = {m: sum(c.values()) for m, c in self.by_model.items()}


class ReplicatedState:
    def __init__(self, cfg: Config, registry: MemberRegistry, master: SdfsMaster, clock: Callable[[], float],
                 scheduler: str, on_finished: Callable[[Job, float], None],
                 on_task_gone: Callable[[TaskInfo], None]) -> None:
        self.cfg = cfg
        self.registry = registry
        self.master = master
        self.clock = clock
        self.scheduler_name = scheduler
        self.on_finished = on_finished  # a job was declared finished (both sides; the coordinator decides what follows)
        self.on_task_gone = on_task_gone  # a task was re-queued: the worker session stops counting it
        self.reset()
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

    def reset(self) -> None:
        """Empty state: everything an op or a restore writes starts here (and only here)."""
        self.jobs = JobTable()
        self.scheduler = make_scheduler(self.scheduler_name)
        self.charged: dict[str, int] = {}  # task id -> images the scheduler was charged (by this coordinator)
        self.busy_seconds: dict[str, float] = {}  # compute time per worker (metrics)
        self.costs = CostTable()
        self.events: list[dict[str, Any]] = []  # timeline for reports: job added, worker failed, ...

    def apply_op(self, op: str, data: dict[str, Any], now: float) -> None:
        handler = self.ops.get(op)
        if handler is None:
            log.warning("unknown state op %r ignored", op)
            return
        handler(data, now)

    # ------------------------------------------------------------------------------------------
    # snapshot and restore, derived from one table

    def parts(self) -> dict[str, tuple[Callable[[], Any], Callable[[Any, float], None]]]:
        """Every replicated part but the jobs (one item each) and SDFS (the master's own store):
        name -> (dump, load). In load order: the tasks need the jobs, which load first."""
        return {
            "members": (self._dump_members, self._load_members),
            "tasks": (self._dump_tasks, self._load_tasks),
            "events": (lambda: self.events[-MAX_EVENTS:], self._load_events),
            "cost": (self.costs.dump, lambda v, now: self.costs.load(v)),
        }

    def head(self) -> dict[str, Any]:
        """Every part but jobs and SDFS, as fresh containers (a transfer freezes it at one seq)."""
        return {name: dump() for name, (dump, _load) in self.parts().items()}

    def snapshot(self) -> dict[str, Any]:
        return self.head() | {"jobs": [j.snapshot() for j in self.jobs.jobs.values()], "sdfs": self.master.snapshot()}

    def restore(self, state: dict[str, Any], now: float) -> None:
        """Install a snapshot (or the state store's items): the state is reset first, so nothing of
        the old one survives, whichever part it lived in."""
        self.reset()
        for jd in state.get("jobs", []):
            self.jobs.add(Job.restore(jd))
        for name, (_dump, load) in self.parts().items():
            if name in state:
                load(state[name], now)
        if "sdfs" in state:  # absent when the snapshot transfer already applied the SDFS entries
            self.master.restore(state["sdfs"])  # tombstones and indexes need the full reset

    def _dump_members(self) -> dict[str, Any]:
        return {"members": self.registry.view(), "view_seq": self.registry.seq}

    def _load_members(self, value: dict[str, Any], now: float) -> None:
        self.registry.restore(value["members"], value["view_seq"], now)

    def _dump_tasks(self) -> list[dict[str, Any]]:
        return [{"task_id": t.task_id, "job_id": t.job_id, "worker": t.worker, "indexes": list(t.indexes),
                 "dispatched": t.dispatched} for t in self.jobs.tasks.values()]

    def _load_tasks(self, tasks: list[dict[str, Any]], now: float) -> None:
        for t in tasks:
            job = self.jobs.jobs.get(t["job_id"])
            if job is not None:  # the job's counts already hold this dispatch: not counted again
                self.jobs.dispatch(job, t["task_id"], t["worker"], list(t["indexes"]), t["dispatched"],
                                   now + self.cfg.task_timeout_min, count=False)

    def _load_events(self, events: list[dict[str, Any]], now: float) -> None:
        self.events = list(events)

    # ------------------------------------------------------------------------------------------
    # ops (run on primary and standby alike)

    def _op_job_add(self, d: dict[str, Any], now: float) -> None:
        self.jobs.add(Job.restore(d))

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
        if job.stats.first_dispatch is None:
            job.stats.first_dispatch = d["dispatched"]

    def _op_task_result(self, d: dict[str, Any], now: float) -> None:
        job = self.jobs.jobs.get(d["job_id"])
        if job is None:
            return
        task = self.jobs.tasks.get(d["task_id"])
        final = bool(d.get("final", True))
        if task is None or task.job_id != job.job_id:  # never another job's task
            task = None
        elif final:
            del self.jobs.tasks[d["task_id"]]
        worker, elapsed = d.get("worker", ""), float(d["elapsed"])
        self.busy_seconds[worker] = self.busy_seconds.get(worker, 0.0) + elapsed
        fresh = self.jobs.record(job, {int(k): v for k, v in d["results"].items()}, task)
        job.stats.duplicates += int(d.get("duplicates", 0))  # (older primaries filtered them out of the op)
        if task is not None:
            if fresh and elapsed > 0:
                self.costs.observe(job.model, worker, elapsed / max(1, len(d["results"])))
            if final:
                # A result that does not answer every query of its task must not lose the rest.
                missing = [i for i in task.indexes if i not in job.results]
                if missing and job.state is not JobState.CANCELLED:
                    job.pending.extendleft(reversed(missing))
                self.refund(task.task_id, job, len(missing))
        if fresh:
            errors = sum(1 for r in fresh.values() if r.get("error"))
            job.stats.record(len(fresh), errors, d["latency"], elapsed, d["ts"], worker)
        self.finish_if_done(job, d["ts"])

    def finish_if_done(self, job: Job, ts: float) -> None:
        """The one place a job is declared finished."""
        if self.jobs.maybe_finish(job, ts):
            log.info("job %s finished: %d results", job.job_id, job.completed)
            self.scheduler.forget(job.job_id)
            self.events.append({"ts": ts, "kind": "job_done", "detail": job.job_id})
            self.on_finished(job, ts)

    def _op_job_cancel(self, d: dict[str, Any], now: float) -> None:
        job = self.jobs.jobs.get(d["job_id"])
        if job is None or job.state in (JobState.DONE, JobState.CANCELLED):
            return
        self.jobs.cancel(job, d["ts"])
        self.scheduler.forget(job.job_id)
        self.finish_if_done(job, d["ts"])  # nothing in flight: finished at once

    def _op_task_requeue(self, d: dict[str, Any], now: float) -> None:
        task, requeued = self.jobs.requeue(d["task_id"])
        if task is None:
            return
        self.on_task_gone(task)
        job = self.jobs.jobs.get(task.job_id)
        if job is not None:
            self.refund(task.task_id, job, requeued)
            self.finish_if_done(job, self.clock())  # a cancelled job's last task was lost: it is over

    def refund(self, task_id: str, job: Job, requeued: int) -> None:
        """The job was charged when these queries went out; charging their re-dispatch again would
        hand its share to the other jobs after every worker failure. Only what this coordinator
        charged is refunded (a standby charged nothing; a new primary did not charge restored tasks)."""
        charged = self.charged.pop(task_id, 0)
        if charged and requeued > 0:
            self.scheduler.refund(job.job_id, min(charged, requeued), job.weight)

    def charge(self, task_id: str, job: Job, n: int) -> None:
        self.scheduler.charge(job.job_id, n, job.weight)
        self.charged[task_id] = n

    def _op_job_results_written(self, d: dict[str, Any], now: float) -> None:
        job = self.jobs.jobs.get(d["job_id"])
        if job is not None and job.results_version is None:  # the first recorded write is the one
            job.results_version = int(d["version"])

    def _op_member(self, d: dict[str, Any], now: float) -> None:
        self.registry.apply(d["event"], d["member"], d["seq"], now)

    def _op_sdfs_files(self, d: dict[str, Any], now: float) -> None:
        self.master.apply_entries(d["entries"])

    def _op_event(self, d: dict[str, Any], now: float) -> None:
        self.events.append(d)
        del self.events[:-MAX_EVENTS]
