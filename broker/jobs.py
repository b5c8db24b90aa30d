"""Jobs, their queries and the tasks (batches of queries) that are out at workers.

Invariant: every query index of a job is in exactly one of ``pending``, a task's ``indexes``, or
``results``. A result is accepted once per query (by index); a re-dispatched query's second
result is dropped, so every input gets exactly one result.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from broker.stats import JobStats


class JobState(StrEnum):
    QUEUED = "queued"  # submitted, waits for `start`
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"  # pending queries dropped; in-flight ones finish (``finished`` set when they have)


def _le_bytes(a: array) -> bytes:
    if sys.byteorder == "little":
        return a.tobytes()
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


def _from_wire(v: Any) -> array:
    """An array of counts from ``dump()``'s bytes, or from a list of ints (states written earlier)."""
    if isinstance(v, bytes | bytearray):
        a = array("I")
        a.frombytes(bytes(v)[: len(v) - len(v) % a.itemsize])
        if sys.byteorder != "little":
            a.byteswap()
        return a
    return array("I", (max(0, int(x)) for x in v))


class QueryCounts:
    """Exactly-once accounting per query of a job, by index (compact arrays, not maps): how often it
    was dispatched, how many results for it arrived (duplicates and late ones included), and how
    many were accepted. ``accepted`` is counted by the one function that records a result
    (:meth:`JobTable.record`), so a result recorded twice shows as 2, whatever else holds it."""

    FIELDS = ("dispatches", "arrivals", "accepted")

    def __init__(self, n: int) -> None:
        self.dispatches = array("I", [0]) * n
        self.arrivals = array("I", [0]) * n
        self.accepted = array("I", [0]) * n
        self.sent = 0  # queries dispatched at least once (slow start grows with it)
        # Kept as they change: summing 100,000-entry arrays cost every `jobs` reply 8 ms per job.
        self.total = dict.fromkeys(self.FIELDS, 0)

    def dispatched(self, index: int) -> None:
        if not self.dispatches[index]:
            self.sent += 1
        self.dispatches[index] += 1
        self.total["dispatches"] += 1

    def arrived(self, index: int) -> None:
        self.arrivals[index] += 1
        self.total["arrivals"] += 1

    def accept(self, index: int) -> None:
        self.accepted[index] += 1
        self.total["accepted"] += 1

    def row(self, index: int) -> dict[str, int]:
        return {"dispatches": self.dispatches[index], "arrivals": self.arrivals[index],
                "accepted": self.accepted[index]}

    def totals(self) -> dict[str, int]:
        return dict(self.total)

    def dump(self) -> dict[str, bytes]:
        """Each array as little-endian bytes: a 100,000-query job's counts are 1.2 MB packed in
        microseconds, where lists of ints cost a compaction tens of milliseconds on the loop."""
        return {name: _le_bytes(getattr(self, name)) for name in self.FIELDS}

    @classmethod
    def load(cls, n: int, d: dict[str, Any] | None, answered: Any = (),
             legacy_dispatches: dict[Any, Any] | None = None) -> QueryCounts:
        """From ``dump()``; or from a state written before the counts (a dispatch map by index,
        one arrival and one acceptance per answered query)."""
        counts = cls(n)
        if d:
            for name in cls.FIELDS:
                values = _from_wire(d.get(name, ()))[:n]
                getattr(counts, name)[:len(values)] = values
        else:
            for k, v in (legacy_dispatches or {}).items():
                if 0 <= int(k) < n:
                    counts.dispatches[int(k)] = int(v)
            for i in answered:
                counts.arrivals[i] = counts.accepted[i] = 1
        counts.sent = sum(1 for v in counts.dispatches if v)
        counts.total = {name: sum(getattr(counts, name)) for name in cls.FIELDS}
        return counts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QueryCounts) and self.dump() == other.dump()


@dataclass
class TaskInfo:
    task_id: str
    job_id: str
    worker: str
    indexes: list[int]
    dispatched: float  # wall clock
    deadline: float  # monotonic


@dataclass
class Job:
    job_id: str
    model: str
    inputs: list[tuple[str, int]]  # (sdfs name, version)
    batch_size: int  # 0: auto, sized per dispatch from the worker's measured cost and latency_target
    weight: float = 1.0
    weights: str = ""  # pinned SDFS checkpoint (submit --weights); "" = the model's default weights
    state: JobState = JobState.QUEUED
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    pending: deque[int] = field(default_factory=deque)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)  # insertion order = completion order
    stats: JobStats | None = None
    counts: QueryCounts | None = None  # dispatches, arrivals and acceptances per query
    # SDFS version of ``results/<job_id>`` once a write of the finished job's results succeeded
    # (replicated op ``job.results_written``; None: the primary still owes that write).
    results_version: int | None = None
    latency_target: float = 0.0  # seconds of compute per batch when batch_size is auto (0)
    request_id: str = ""  # the submit's request id: a retried submit returns this job, not a new one

    def __post_init__(self) -> None:
        if self.stats is None:
            self.stats = JobStats(self.job_id)
        if self.counts is None:
            self.counts = QueryCounts(len(self.inputs))
        if not self.pending and not self.results:
            self.pending.extend(range(len(self.inputs)))

    @property
    def total(self) -> int:
        return len(self.inputs)

    @property
    def completed(self) -> int:
        """Queries answered: the one count of them (``results`` holds one entry per answered query)."""
        return len(self.results)

    def qid(self, index: int) -> str:
        return f"{self.job_id}:{index}"

    def row(self, index: int) -> dict[str, Any]:
        """The result row of one answered query, as the ``results`` command and the results file show it."""
        return ({"qid": self.qid(index), "input": self.inputs[index][0]} | self.results[index]
                | self.counts.row(index))

    def rows(self) -> list[dict[str, Any]]:
        """Every result row, by query index."""
        return [self.row(i) for i in sorted(self.results)]

    def describe(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "model": self.model,
            "state": str(self.state),
            "batch_size": self.batch_size or "auto",
            "latency_target": self.latency_target or None,
            "weight": self.weight,
            "weights": self.weights,
            "total": self.total,
            "completed": self.completed,
            "pending": len(self.pending),
            "submitted": self.submitted,
            "started": self.started,
            "finished": self.finished,
            "results_version": self.results_version,
            **self.counts.totals(),
        }

    def snapshot(self) -> dict[str, Any]:
        d = self.describe()
        d["inputs"] = self.inputs  # never changed after submit: shared, not copied (msgpack packs tuples)
        d["results"] = {str(k): v for k, v in self.results.items()}
        d["stats"] = self.stats.snapshot() if self.stats else None
        d["counts"] = self.counts.dump()
        d["request_id"] = self.request_id
        return d

    def durable(self) -> dict[str, Any]:
        """``snapshot()`` for the state store: the same fields, built with C-level copies (int keys:
        the store's msgpack reads them, the wire's does not), since the loop waits for it."""
        d = self.describe()
        d["inputs"] = self.inputs
        d["results"] = dict(self.results)
        d["stats"] = self.stats.snapshot() if self.stats else None
        d["counts"] = self.counts.dump()
        d["request_id"] = self.request_id
        return d

    def durable_key(self) -> tuple[Any, ...] | None:
        """What changes whenever a finished job's durable content can change (None while it runs):
        the state store re-uses a finished job's snapshot item until this changes."""
        if self.finished is None or self.stats is None:
            return None
        return (str(self.state), self.finished, self.completed, self.stats.duplicates,
                self.results_version, self.batch_size, self.latency_target, self.weight)
        # (The counts need no term of their own: once a job is finished nothing is dispatched and
        # nothing more is accepted, and every later arrival is a duplicate, counted above.)

    @classmethod
    def restore(cls, d: dict[str, Any]) -> Job:
        job = cls(
            job_id=d["job_id"],
            model=d["model"],
            inputs=[(str(n), int(v)) for n, v in d["inputs"]],
            batch_size=0 if d["batch_size"] == "auto" else int(d["batch_size"]),
            weight=float(d.get("weight", 1.0)),
            weights=str(d.get("weights") or ""),
            state=JobState(d["state"]),
            submitted=float(d["submitted"]),
            started=d.get("started"),
            finished=d.get("finished"),
            results={int(k): v for k, v in d.get("results", {}).items()},
            stats=JobStats.restore(d["stats"]) if d.get("stats") else None,
            results_version=d.get("results_version"),
            latency_target=float(d.get("latency_target") or 0.0),
            request_id=str(d.get("request_id") or ""),
        )
        job.counts = QueryCounts.load(job.total, d.get("counts"), job.results,
                                      d.get("dispatches") if isinstance(d.get("dispatches"), dict) else None)
        # Whatever was in flight at the old primary is pending again (its late results still count once);
        # a cancelled job has nothing pending.
        if job.state is not JobState.CANCELLED:
            job.pending = deque(i for i in range(job.total) if i not in job.results)
        else:
            job.pending = deque()
        return job


MAX_TOP = 1000  # labels per answer: the worker sends 5; anything this long is not an answer


def _check_answer(top: Any, error: Any) -> tuple[list[list[Any]], str | None]:
    """The (top5, error) of one answer, or ValueError if it is not what a worker sends."""
    if error is not None and not isinstance(error, str):
        raise ValueError("error is not text")
    if top is None:
        top = []
    if not isinstance(top, list) or len(top) > MAX_TOP:
        raise ValueError("top5 is not a list of [label, probability]")
    for pair in top:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool) and math.isfinite(pair[1])):
            raise ValueError("top5 is not a list of [label, finite probability]")
    return top, error


def parse_answers(job: Job, task: TaskInfo | None, entries: list[Any]) -> dict[int, tuple[list[list[Any]], str | None]]:
    """Check a TaskResult's answers against the job and the task they answer: ``{index: (top5, error)}``.

    Every answer is ``[index, top5, error]`` with the index of a query of this job, and of the task
    when it is known, at most once, well formed. Anything else raises ValueError: a worker never
    sends it, so the whole result is not trusted.
    """
    allowed = set(task.indexes) if task is not None else None
    out: dict[int, tuple[list[list[Any]], str | None]] = {}
    for r in entries:
        if not isinstance(r, list) or len(r) != 3:
            raise ValueError("an answer is not [index, top5, error]")
        idx = r[0]
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < job.total:
            raise ValueError(f"{idx!r:.60} is not a query index of {job.job_id}")
        if allowed is not None and idx not in allowed:
            raise ValueError(f"query {idx} is not part of this task")
        if idx in out:
            raise ValueError(f"query {idx} answered twice")
        out[idx] = _check_answer(r[1], r[2])
    return out


class JobTable:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.by_request: dict[str, str] = {}  # submit request id -> job id (replicated with the jobs)
        self.tasks: dict[str, TaskInfo] = {}
        self._task_ids = itertools.count(1)
        self._job_ids = itertools.count(1)
        self._next_job = 1

    def new_job_id(self, model: str) -> str:
        while True:
            job_id = f"job{next(self._job_ids)}-{model}"
            if job_id not in self.jobs:
                return job_id

    def add(self, job: Job) -> None:
        self.jobs[job.job_id] = job
        if job.request_id:
            self.by_request[job.request_id] = job.job_id
        # A restored job keeps its number out of the counter: after a restart the next job must
        # not be ``job1-<another model>`` beside the old ``job1-<model>``.
        head = job.job_id.split("-", 1)[0]
        if head.startswith("job") and head[3:].isdigit():
            n = int(head[3:])
            if n >= self._next_job:
                self._next_job = n + 1
                self._job_ids = itertools.count(self._next_job)

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state is JobState.RUNNING]

    def backlogged(self) -> list[Job]:
        return [j for j in self.running() if j.pending]

    def next_task_id(self, job_id: str, term: int) -> str:
        # The term makes ids unique across coordinators: after a takeover the new primary's counter
        # starts again, and a late result for the old primary's "t5" must not answer the new "t5".
        return f"t{term}.{next(self._task_ids)}-{job_id}"

    def dispatch(
        self, job: Job, task_id: str, worker: str, indexes: list[int], dispatched: float, deadline: float,
        count: bool = True,
    ) -> TaskInfo:
        """Move ``indexes`` from the job's queue into a task held by ``worker`` (``count``: a new
        dispatch, not a restored one the job's counts already hold)."""
        taken = set(indexes)
        if list(itertools.islice(job.pending, len(indexes))) == indexes:
            for _ in indexes:
                job.pending.popleft()
        else:
            job.pending = deque(i for i in job.pending if i not in taken)
        if count:
            for i in indexes:
                job.counts.dispatched(i)
        task = TaskInfo(task_id, job.job_id, worker, indexes, dispatched, deadline)
        self.tasks[task_id] = task
        return task

    def requeue(self, task_id: str) -> tuple[TaskInfo | None, int]:
        """Put an unfinished task's queries back at the front of its job's queue: (the task, how many)."""
        task = self.tasks.pop(task_id, None)
        if task is None:
            return None, 0
        job = self.jobs.get(task.job_id)
        todo: list[int] = []
        if job is not None and job.state is not JobState.CANCELLED:  # a cancelled job's queries are dropped
            todo = [i for i in task.indexes if i not in job.results and i not in job.pending]
            job.pending.extendleft(reversed(todo))
        return task, len(todo)

    def in_flight(self, job_id: str) -> int:
        """Queries out at workers and not answered yet (a streaming task answers piece by piece)."""
        job = self.jobs.get(job_id)
        done = job.results if job is not None else {}
        return sum(1 for t in self.tasks.values() if t.job_id == job_id for i in t.indexes if i not in done)

    def cancel(self, job: Job, now: float) -> int:
        """Drop the job's pending queries (in-flight ones still finish); return how many were dropped."""
        dropped = len(job.pending)
        job.pending.clear()
        job.state = JobState.CANCELLED
        return dropped

    def tasks_of(self, worker: str) -> list[TaskInfo]:
        return [t for t in self.tasks.values() if t.worker == worker]

    def record(
        self, job: Job, results: dict[int, dict[str, Any]], task: TaskInfo | None = None
    ) -> dict[int, dict[str, Any]]:
        """The one place a result is accepted or counted as a duplicate; return the accepted ones.

        Every answer counts as an arrival of its query. With the task that carried them known, only
        its own queries are accepted (none of them can be pending). A late result whose task was
        re-queued (or dispatched by an earlier primary) counts for whatever is still unanswered,
        and those queries leave the pending queue. The rest (answered before) are duplicates.
        """
        allowed = set(task.indexes) if task is not None else None
        fresh = {}
        for i, r in results.items():
            if not 0 <= i < job.total:
                continue
            job.counts.arrived(i)
            if i not in job.results and (allowed is None or i in allowed):
                fresh[i] = r
                job.counts.accept(i)
        job.results.update(fresh)
        job.stats.duplicates += len(results) - len(fresh)
        if fresh and task is None:
            job.pending = deque(i for i in job.pending if i not in fresh)
        return fresh

    def maybe_finish(self, job: Job, now: float) -> bool:
        if job.state is JobState.RUNNING and job.completed == job.total:
            job.state = JobState.DONE
            job.finished = now
            return True
        if job.state is JobState.CANCELLED and job.finished is None and not self.in_flight(job.job_id):
            job.finished = now  # the last in-flight query of a cancelled job came back
            return True
        return False
