"""The scheduling policy, in one replaceable module: which job a free worker slot serves next.

Fair-time policy (start-time fair queueing over images): every job has a virtual time that grows
by ``images / weight`` each time it is dispatched; a free slot goes to the backlogged job with the
smallest virtual time. A job that becomes backlogged (a new job, or one that was idle) starts at
the current minimum, so it is served at once but cannot claim credit for the time it was absent.
Queries that come back unanswered (their worker failed, or the task timed out) are refunded when
they are re-queued, so a worker failure does not cost the job it was serving part of its share.

Equal images per unit of virtual time means equal query rates: the expensive model's batches take
longer, so it automatically receives more worker time, in proportion to its measured cost, on
workers of any speed and for any number of jobs. ``weight`` gives a job a proportional share.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass


@dataclass
class Candidate:
    job_id: str
    weight: float


class FairTimeScheduler:
    name = "fair-time"

    def __init__(self) -> None:
        self.vtime: dict[str, float] = {}
        self.backlogged: set[str] = set()

    def _activate(self, job_id: str) -> None:
        if job_id in self.backlogged:
            return
        others = [self.vtime[j] for j in self.backlogged if j in self.vtime]
        floor = min(others) if others else max(self.vtime.values(), default=0.0)
        self.vtime[job_id] = max(self.vtime.get(job_id, 0.0), floor)
        self.backlogged.add(job_id)

    def pick(self, candidates: Iterable[Candidate], among: Collection[str] | None = None) -> Candidate | None:
        """The backlogged job with the smallest virtual time; ``among``: only these may be chosen (a
        worker's pool), while every candidate still counts as backlogged (keeps its claim)."""
        cands = list(candidates)
        live = {c.job_id for c in cands}
        self.backlogged &= live  # jobs with nothing pending stop accruing a claim
        for c in cands:
            self._activate(c.job_id)
        if among is not None:
            cands = [c for c in cands if c.job_id in among]
        if not cands:
            return None
        return min(cands, key=lambda c: (self.vtime[c.job_id], c.job_id))

    def charge(self, job_id: str, images: int, weight: float) -> None:
        self.vtime[job_id] = self.vtime.get(job_id, 0.0) + images / max(weight, 1e-9)

    def refund(self, job_id: str, images: int, weight: float) -> None:
        """Undo the charge of queries that were dispatched but came back unanswered (re-queued)."""
        if job_id in self.vtime:
            self.vtime[job_id] -= images / max(weight, 1e-9)

    def forget(self, job_id: str) -> None:
        self.vtime.pop(job_id, None)
        self.backlogged.discard(job_id)


class RoundRobinScheduler(FairTimeScheduler):
    """Equal share of *dispatches* (batches) regardless of size: the baseline for benchmarks."""

    name = "round-robin"

    def charge(self, job_id: str, images: int, weight: float) -> None:
        super().charge(job_id, 1, 1.0)

    def refund(self, job_id: str, images: int, weight: float) -> None:
        super().refund(job_id, 1, 1.0)


SCHEDULERS = {cls.name: cls for cls in (FairTimeScheduler, RoundRobinScheduler)}


def make_scheduler(name: str = "fair-time") -> FairTimeScheduler:
    try:
        return SCHEDULERS[name]()
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}") from None
