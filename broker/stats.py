"""Per-job statistics: the one place the shell, metrics, top and report read from.

Query rate is images per second over a sliding window (default 10 s). A batch's images are spread
over the batch's compute interval (a fluid count), so a window edge that cuts a batch in half
counts half of it: without that, rates jump by a whole batch at each completion and two equally
served jobs look 10-20 % apart on short windows. Timestamps are wall-clock so the standby's copy
of the statistics stays meaningful after a takeover.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Completion:
    start: float
    end: float
    n: int


@dataclass
class Span:
    """One batch on one worker: for the worker-assignment timeline."""

    worker: str
    start: float
    end: float
    n: int


@dataclass
class JobStats:
    job_id: str
    completed: int = 0
    errors: int = 0
    first_result: float | None = None
    latencies: list[float] = field(default_factory=list)  # seconds, dispatch -> result, per query
    compute: list[float] = field(default_factory=list)  # seconds of compute per image
    history: deque[Completion] = field(default_factory=lambda: deque(maxlen=100_000))
    spans: deque[Span] = field(default_factory=lambda: deque(maxlen=20_000))
    started: float | None = None  # first dispatch
    duplicates: int = 0  # results dropped because their query already had one (re-dispatched queries)

    def record(self, n: int, errors: int, latency: float, elapsed: float, now: float, worker: str = "") -> None:
        if n <= 0:
            return
        self.spans.append(Span(worker, now - latency, now, n))
        self.completed += n
        self.errors += errors
        if self.first_result is None:
            self.first_result = now
        self.latencies.extend([latency] * n)
        self.compute.extend([elapsed / n] * n)
        start = now - max(elapsed, 1e-6)
        self.history.append(Completion(start, now, n))

    def images_between(self, t0: float, t1: float) -> float:
        total = 0.0
        for c in reversed(self.history):
            if c.end <= t0:
                break
            overlap = min(c.end, t1) - max(c.start, t0)
            if overlap > 0:
                total += c.n * overlap / (c.end - c.start)
        return total

    def rate(self, now: float, window: float) -> float:
        """Images per second over the last ``window`` seconds, or since the first dispatch when the
        job is younger than that (dividing a 3 s old job's images by 10 s would understate it)."""
        if self.first_result is None:
            return 0.0
        if self.started is not None:
            window = max(1e-3, min(window, now - self.started))
        return self.images_between(now - window, now) / window

    def overall_rate(self) -> float:
        """Images per second from the first dispatch to the last result."""
        if not self.history or self.started is None:
            return 0.0
        span = self.history[-1].end - self.started
        return self.completed / span if span > 0 else 0.0

    def series(self, window: float, step: float = 1.0) -> list[list[float]]:
        """[t, rate over the window ending at t] from the first result to the last (for reports)."""
        if not self.history:
            return []
        t, end = self.history[0].start, self.history[-1].end
        out = []
        while t <= end + step:
            out.append([t, self.images_between(t - window, t) / window])
            t += step
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "completed": self.completed,
            "errors": self.errors,
            "first_result": self.first_result,
            "latencies": self.latencies[-20_000:],
            "compute": self.compute[-20_000:],
            "history": [[c.start, c.end, c.n] for c in list(self.history)[-5_000:]],
            "spans": [[sp.worker, sp.start, sp.end, sp.n] for sp in list(self.spans)[-5_000:]],
            "started": self.started,
            "duplicates": self.duplicates,
        }

    @classmethod
    def restore(cls, d: dict[str, Any]) -> JobStats:
        s = cls(d["job_id"], int(d["completed"]), int(d["errors"]), d.get("first_result"))
        s.latencies = list(d.get("latencies", []))
        s.compute = list(d.get("compute", []))
        s.history.extend(Completion(float(a), float(b), int(n)) for a, b, n in d.get("history", []))
        s.spans.extend(Span(str(w), float(a), float(b), int(n)) for w, a, b, n in d.get("spans", []))
        s.started = d.get("started")
        s.duplicates = int(d.get("duplicates", 0))
        return s


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0, "avg": math.nan, "std": math.nan, "median": math.nan, "p90": math.nan,
                "p95": math.nan, "p99": math.nan}
    s = sorted(values)
    return {
        "count": len(s),
        "avg": statistics.fmean(s),
        "std": statistics.pstdev(s) if len(s) > 1 else 0.0,
        "median": statistics.median(s),
        "p90": percentile(s, 90),
        "p95": percentile(s, 95),
        "p99": percentile(s, 99),
    }


def rate_gap(rates: list[float]) -> float:
    """Fairness measure |r1 - r2| / max(r1, r2), generalized to N jobs as (max - min) / max."""
    if len(rates) < 2 or max(rates) <= 0:
        return 0.0
    return (max(rates) - min(rates)) / max(rates)
