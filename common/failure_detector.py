"""An adaptive failure detector for one peer: φ accrual over heartbeat inter-arrival times.

A fixed timeout is wrong in both directions: on a busy machine heartbeats arrive late and a
healthy node is declared failed; made long enough for the busy case, a real failure on a quiet
network takes ages to notice. The φ-accrual detector (Hayashibara et al. 2004, as used by Akka and
Cassandra) learns each peer's heartbeat inter-arrival distribution (mean and standard deviation
over a sliding window) and suspects the peer once the current silence is improbable under it:

    φ(t) = -log10(1 - F(t)),  F = normal CDF with mean μ + pause and deviation max(σ, min_std)

so the peer is declared failed after ``μ + pause + z·σ`` seconds of silence, where z is the
normal quantile with tail 10^-φ (z ≈ 5.6 for φ = 8). That timeout is clamped to
``[min_timeout, max_timeout]``: the floor keeps detection as fast as the old fixed timeout on a
quiet network, the ceiling bounds detection time whatever the peer's history.

Our own pauses are not the peer's fault: when the owner of the detector was itself frozen (a loop
stall, SIGSTOP, swap), it calls :meth:`excuse` with the length of its stall and the deadline moves
by that much (Cassandra's local-pause guard). A heartbeat ends the excuse.

Everything here is pure arithmetic on the caller's ``time.monotonic()`` values: no clock, no I/O,
so unit tests drive it in virtual time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist

# A loop that polls at most 0.1 s at a time and sees a gap longer than this between two of its
# iterations was itself stalled; it excuses its peers for that long (see PhiAccrual.excuse).
LOCAL_STALL = 0.25


@dataclass(frozen=True)
class DetectorParams:
    interval: float = 0.5  # the heartbeat interval peers are configured with (seeds the history)
    min_timeout: float = 1.5  # never declare failure sooner than this much silence
    max_timeout: float = 4.0  # always declare failure after this much silence
    phi: float = 8.0  # suspicion threshold: 1e-8 chance that a live peer is this late
    min_std: float = 0.1  # floor on σ, so a perfectly regular peer is not failed by 10 ms of jitter
    pause: float = 0.5  # acceptable extra pause on top of the mean interval (GC, scheduling)
    window: int = 100  # inter-arrival samples kept

    @classmethod
    def fixed(cls, timeout: float) -> DetectorParams:
        """A plain fixed-timeout detector (the baseline; also what a short test wants)."""
        return cls(interval=timeout / 3, min_timeout=timeout, max_timeout=timeout)

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(1.0 - 10.0 ** (-self.phi))


class PhiAccrual:
    """Heartbeat history and suspicion level of one peer."""

    def __init__(self, params: DetectorParams, now: float) -> None:
        self.params = params
        self._z = params.z
        self.last = now
        self.excused = 0.0
        self.max_gap = 0.0  # the longest silence that ended in a heartbeat (observability)
        self.intervals: deque[float] = deque(maxlen=params.window)
        # Seed as Akka does: one interval either side of the expected one, so a new peer starts with
        # a sensible mean and deviation instead of an empty history.
        self.intervals.extend((params.interval * 0.75, params.interval * 1.25))
        self._sum = sum(self.intervals)
        self._sq = sum(x * x for x in self.intervals)

    def heartbeat(self, now: float) -> None:
        gap = now - self.last
        if gap < 0:
            return  # out-of-order call: keep the newer arrival
        self.max_gap = max(self.max_gap, gap - self.excused)
        self.last = now
        if self.excused:
            # This interval holds our own stall: it says nothing about the peer's rhythm.
            self.excused = 0.0
            return
        if len(self.intervals) == self.intervals.maxlen:
            old = self.intervals[0]
            self._sum -= old
            self._sq -= old * old
        self.intervals.append(gap)
        self._sum += gap
        self._sq += gap * gap

    def excuse(self, seconds: float) -> None:
        """Do not count ``seconds`` of our own stall against the peer."""
        if seconds > 0:
            self.excused += seconds

    @property
    def mean(self) -> float:
        return self._sum / len(self.intervals)

    @property
    def std(self) -> float:
        n = len(self.intervals)
        var = max(0.0, self._sq / n - self.mean**2)
        return math.sqrt(var)

    def timeout(self) -> float:
        """Seconds of silence after which φ crosses the threshold (clamped to the configured range)."""
        p = self.params
        t = self.mean + p.pause + self._z * max(self.std, p.min_std)
        return min(p.max_timeout, max(p.min_timeout, t))

    def deadline(self) -> float:
        return self.last + self.excused + self.timeout()

    def phi(self, now: float) -> float:
        """The suspicion level now (for display; decisions use :meth:`deadline`)."""
        p = self.params
        elapsed = now - self.last - self.excused
        sd = max(self.std, p.min_std)
        tail = 1.0 - NormalDist(self.mean + p.pause, sd).cdf(elapsed)
        return math.inf if tail <= 0 else -math.log10(tail)

    def failed(self, now: float) -> bool:
        return now > self.deadline()
