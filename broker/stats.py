"""Per-job statistics: the one place the shell, metrics, top and report read from.

Query rate is images per second over a sliding window (default 10 s). A batch's images are spread
over the batch's compute interval (a fluid count), so a window edge that cuts a batch in half
counts half of it: without that, rates jump by a whole batch at each completion and two equally
served jobs look 10-20 % apart on short windows. ``query_rate`` also fades the window's edges over
one long piece or a job's burst period (``JobStats.rate``'s ``ramp``, ``burst_period``), for jobs
served in bursts. Timestamps are wall-clock so the standby's copy of the statistics stays
meaningful after a takeover.

Latency and compute time per image are kept as a ``Distribution``: exact count, mean, standard
deviation, min and max (Welford's running moments), and quantiles from a DDSketch with 1 % relative
accuracy and at most ``SKETCH_BINS`` bins. Memory, snapshot size and the cost of a summary are
constant per job however many queries it answers (a sorted list of every latency was not).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import CollapsingLowestDenseStore

RELATIVE_ACCURACY = 0.01  # quantiles are within 1 % of a value whose rank is the requested one
SKETCH_BINS = 2048  # 1 % bins cover 1e-6 s .. 1e11 s before the lowest ones merge: never in practice
RECENT_LATENCIES = 20_000  # per-query latencies the timeline (report histogram) shows
_MAPPING = LogarithmicMapping(RELATIVE_ACCURACY)  # value <-> bin key; immutable, shared


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


class Distribution:
    """Count, mean, std, min, max and quantiles of a stream of non-negative values in constant space.

    Values are added with a weight (a batch of n images adds its per-image figure once, weight n).
    A value that is not finite is ignored and a negative one counts as 0, so one absurd report from
    a worker cannot break a summary, a snapshot or the standby's copy.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean (Welford)
        self.min = math.inf
        self.max = -math.inf
        self._store = CollapsingLowestDenseStore(SKETCH_BINS)
        self._sketch = self._new_sketch(self._store, 0.0)

    @staticmethod
    def _new_sketch(store: CollapsingLowestDenseStore, zeros: float) -> BaseDDSketch:
        # Built from its parts (not DDSketch()) so the bins can be serialized and restored through
        # the store's own fields; values are never negative, so the negative store stays empty.
        return BaseDDSketch(_MAPPING, store, CollapsingLowestDenseStore(SKETCH_BINS), zeros)

    def add(self, value: float, n: int = 1) -> None:
        if n <= 0 or not math.isfinite(value):
            return
        value = max(0.0, value)
        total = self.count + n
        delta = value - self.mean
        self.mean += delta * n / total
        self.m2 += delta * delta * self.count * n / total  # Chan et al.: merge n copies of one value
        self.count = total
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        self._sketch.add(value, n)

    def _at_rank(self, k: int) -> float:
        """The k-th smallest value (0-based) within RELATIVE_ACCURACY, clamped to the exact min and max.
        DDSketch answers rank q * (count - 1) with the bin whose running count exceeds it: half a
        rank above k keeps float error off the bin edge."""
        q = min(1.0, (k + 0.5) / (self.count - 1)) if self.count > 1 else 0.0
        return min(self.max, max(self.min, self._sketch.get_quantile_value(q)))

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile (0 <= q <= 1), as the sorted-list percentile it replaces."""
        if not self.count:
            return math.nan
        return self._at_rank(max(0, min(self.count - 1, math.ceil(q * self.count) - 1)))

    def median(self) -> float:
        """Middle value, or the mean of the two middle ones (as ``statistics.median``)."""
        if not self.count:
            return math.nan
        half = self.count // 2
        return self._at_rank(half) if self.count % 2 else (self._at_rank(half - 1) + self._at_rank(half)) / 2

    def cumulative(self, bounds: Iterable[float]) -> list[int]:
        """How many values are <= each bound (ascending bounds), for cumulative histogram buckets.
        Bin-exact: a value within 1 % of a bound may be counted on either side of it."""
        st, out = self._store, []
        zeros = self.count - int(st.count)
        n, i = zeros, st.min_key if st.count else 0
        for bound in bounds:
            if bound < 0:
                out.append(0)
                continue
            if bound >= self.max:
                out.append(self.count)
                continue
            last = _MAPPING.key(bound) if bound > 0 else i - 1
            while st.count and i <= min(last, st.max_key):
                n += int(st.bins[i - st.offset])
                i += 1
            out.append(n)
        return out

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0, "avg": math.nan, "std": math.nan, "median": math.nan, "p90": math.nan,
                    "p95": math.nan, "p99": math.nan}
        return {
            "count": self.count,
            "avg": self.mean,
            "std": math.sqrt(max(0.0, self.m2 / self.count)),  # population std, as statistics.pstdev
            "median": self.median(),
            "p90": self.quantile(0.90),
            "p95": self.quantile(0.95),
            "p99": self.quantile(0.99),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data for snapshots and standby sync: the moments and the occupied bin range."""
        st = self._store
        lo, hi = (st.min_key, st.max_key) if st.count else (0, -1)
        bins = [int(c) for c in st.bins[lo - st.offset:hi - st.offset + 1]]
        return {"n": self.count, "mean": self.mean, "m2": self.m2, "min": self.min, "max": self.max,
                "zeros": self.count - int(st.count), "k0": lo, "bins": bins}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Distribution:
        out = cls()
        out.count, out.mean, out.m2 = int(d["n"]), float(d["mean"]), float(d["m2"])
        out.min, out.max = float(d["min"]), float(d["max"])
        k0 = int(d["k0"])
        for i, c in enumerate(d["bins"]):
            if c:
                out._store.add(k0 + i, int(c))
        out._sketch = cls._new_sketch(out._store, float(d["zeros"]))
        return out

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        out = cls()
        for v in values:
            out.add(v)
        return out


@dataclass
class JobStats:
    job_id: str
    errors: int = 0
    first_result: float | None = None
    latencies: Distribution = field(default_factory=Distribution)  # seconds, dispatch -> result, per query
    compute: Distribution = field(default_factory=Distribution)  # seconds of compute per image
    history: deque[Completion] = field(default_factory=lambda: deque(maxlen=100_000))
    spans: deque[Span] = field(default_factory=lambda: deque(maxlen=20_000))
    # The rate's origin: the job's first dispatch (not Job.started, the `start` command's time: a job
    # started while every worker was busy has no rate until it runs).
    first_dispatch: float | None = None
    duplicates: int = 0  # results dropped because their query already had one (re-dispatched queries)

    def record(self, n: int, errors: int, latency: float, elapsed: float, now: float, worker: str = "") -> None:
        if n <= 0:
            return
        if self.history and now < self.history[-1].end:
            # Ends stay in order (the rate's scans stop at the first piece before their window): a
            # new primary's clock may be behind the old one's, or the clock stepped back.
            now = self.history[-1].end
        self.spans.append(Span(worker, now - latency, now, n))
        self.errors += errors
        if self.first_result is None:
            self.first_result = now
        self.latencies.add(latency, n)
        self.compute.add(elapsed / n, n)
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

    def rate(self, now: float, window: float, lag: float = 0.0, ramp: float = 0.0) -> float:
        """Images per second over the ``window`` seconds that end ``lag`` seconds ago, or since the
        first dispatch when the job is younger than that (dividing a 3 s old job's images by 10 s
        would understate it). Each piece's images are spread over the time it was computed, so an
        image still being computed is missing from the window's end: ``lag`` (see
        :meth:`longest_piece`) keeps the window where every piece is known.

        ``ramp`` > 0 tapers both edges: the rate is the mean of the window's rates over the ends in
        the last ``ramp`` seconds before ``now - lag`` (a window of the same length whose edges fade
        in and out over ``ramp``). A job served in bursts between another model's long pieces (a
        cheap model sharing its one worker with vgg16's 0.7 s images) moved a square window's rate
        by a whole burst as an edge crossed it; spread over one long piece, the edge moves it by
        little. A job younger than ``window + ramp`` keeps square edges."""
        if self.first_result is None:
            return 0.0
        end = max(now - max(lag, 0.0), self.first_result)
        if self.first_dispatch is not None:
            age = end - self.first_dispatch
            if age < window + ramp:
                ramp = 0.0
            window = max(1e-3, min(window, age))
        if ramp <= 1e-6:  # (below the pieces' own floor: square edges)
            return self.images_between(end - window, end) / window
        return self.images_tapered(end - ramp - window, end - window, window) / window

    def images_tapered(self, u0: float, u1: float, width: float) -> float:
        """The mean of ``images_between(u, u + width)`` over every ``u`` in ``[u0, u1]``, exactly, in
        one pass: a piece wholly inside every such window counts whole, one at an edge by how much
        of it the windows hold on average (``_covered``)."""
        total = 0.0
        for c in reversed(self.history):
            if c.end <= u0:
                break
            if c.start >= u1 + width:
                continue
            if c.start >= u1 and c.end <= u0 + width:
                total += c.n
            else:
                total += c.n * _covered(c.start, c.end, u0, u1, width)
        return total

    def longest_piece(self, now: float, window: float) -> float:
        """How long the pieces that ended in the last ``window`` seconds took to compute, at the
        90th percentile: a piece being computed now started at most about that long ago. (Not the
        maximum: a task re-sent whole after a takeover arrives as one piece of its summed time.)"""
        times = []
        for c in reversed(self.history):
            if c.end <= now - window:
                break
            times.append(c.end - c.start)
        if not times:
            return 0.0
        times.sort()
        return times[min(len(times) - 1, int(0.9 * len(times)))]

    def burst_period(self, now: float, window: float) -> float:
        """How often the job's service stops and starts again, over the last ``window`` seconds: the
        time from one gap in its compute (no piece of it running on any worker, for at least its
        median piece's time) to the next, as the median over time (half of the span between the
        first and last gap is in cycles at least this long); 0 with fewer than two such gaps. A
        job computed back to back, by one worker or several, has none (the round trip between two
        pieces is far shorter than a piece); a cheap model served between vgg16's images on a
        shared worker runs in bursts a second or more apart, and a rate window's edge crossing one
        moves its rate by the whole burst (see :meth:`rate`'s ``ramp``).

        One pass from the newest piece back: the ends are in order (``record``), so a piece ending
        before the earliest start of every later-ending piece ends a gap, and the gaps found are
        exactly those of the union of the pieces."""
        gaps: list[tuple[float, float]] = []  # (start, length) of each gap, newest first
        covered_from = math.inf
        pieces: list[float] = []
        for c in reversed(self.history):
            if c.end <= now - window:
                break
            if c.end < covered_from - 1e-9 and covered_from < math.inf:
                gaps.append((c.end, covered_from - c.end))
            covered_from = min(covered_from, c.start)
            pieces.append(c.end - c.start)
        # (The median, not the mean: a task re-sent whole after a takeover is one piece of its
        # summed time.)
        typical = statistics.median(pieces) if pieces else 0.0
        starts = [start for start, length in gaps if length >= typical]
        if len(starts) < 2:
            return 0.0
        cycles = sorted((a - b for a, b in zip(starts, starts[1:], strict=False)), reverse=True)
        half, acc = sum(cycles) / 2, 0.0
        for cycle in cycles:
            acc += cycle
            if acc >= half:
                return cycle
        return cycles[-1]

    def overall_rate(self) -> float:
        """Images per second from the first dispatch to the last result."""
        if not self.history or self.first_dispatch is None:
            return 0.0
        span = self.history[-1].end - self.first_dispatch
        return self.latencies.count / span if span > 0 else 0.0

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

    def recent_latencies(self, limit: int = RECENT_LATENCIES) -> list[float]:
        """The last ``limit`` per-query latencies, oldest first, from the batch spans (a span runs
        from dispatch to result, so its length is its queries' latency)."""
        out: list[float] = []
        for sp in reversed(self.spans):
            if len(out) >= limit:
                break
            out.extend([sp.end - sp.start] * min(sp.n, limit - len(out)))
        out.reverse()
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "errors": self.errors,
            "first_result": self.first_result,
            "latency": self.latencies.to_dict(),
            "compute_time": self.compute.to_dict(),
            "history": [[c.start, c.end, c.n] for c in list(self.history)[-5_000:]],
            "spans": [[sp.worker, sp.start, sp.end, sp.n] for sp in list(self.spans)[-5_000:]],
            "first_dispatch": self.first_dispatch,
            "duplicates": self.duplicates,
        }

    @classmethod
    def restore(cls, d: dict[str, Any]) -> JobStats:
        s = cls(d["job_id"], int(d["errors"]), d.get("first_result"))
        if "latency" in d:
            s.latencies = Distribution.from_dict(d["latency"])
            s.compute = Distribution.from_dict(d["compute_time"])
        else:  # a state written before the sketch: its (last 20,000) values
            s.latencies = Distribution.of(d.get("latencies", []))
            s.compute = Distribution.of(d.get("compute", []))
        s.history.extend(Completion(float(a), float(b), int(n)) for a, b, n in d.get("history", []))
        s.spans.extend(Span(str(w), float(a), float(b), int(n)) for w, a, b, n in d.get("spans", []))
        s.first_dispatch = d.get("first_dispatch", d.get("started"))  # "started": states written before the rename
        s.duplicates = int(d.get("duplicates", 0))
        return s


def summarize(values: Distribution | Iterable[float]) -> dict[str, float]:
    """count, avg, std, median, p90, p95, p99 of a Distribution (or of plain values, via one)."""
    return (values if isinstance(values, Distribution) else Distribution.of(values)).summary()


def _covered(a: float, b: float, u0: float, u1: float, width: float) -> float:
    """The mean over ``t`` in ``[a, b]`` of the share of the windows ``[u, u + width]``, ``u`` in
    ``[u0, u1]``, that hold ``t``: a trapezoid in ``t`` (0 before ``u0``, rising to 1 at ``u1``,
    falling from ``u0 + width`` to 0 at ``u1 + width``), integrated exactly between its corners."""
    r = u1 - u0

    def share(t: float) -> float:
        return max(0.0, min(u1, t) - max(u0, t - width)) / r

    if b <= a:
        return share(a)
    points = [a, *sorted(p for p in (u0, u1, u0 + width, u1 + width) if a < p < b), b]
    area = sum((q - p) * (share(p) + share(q)) / 2 for p, q in zip(points, points[1:], strict=False))
    return area / (b - a)


def rate_gap(rates: list[float]) -> float:
    """Fairness measure |r1 - r2| / max(r1, r2), generalized to N jobs as (max - min) / max."""
    if len(rates) < 2 or max(rates) <= 0:
        return 0.0
    return (max(rates) - min(rates)) / max(rates)
