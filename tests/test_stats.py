"""Latency statistics in constant space: the DDSketch-backed Distribution and JobStats' snapshot."""

from __future__ import annotations

import math
import random
import statistics

import msgpack
import pytest

from broker.stats import RELATIVE_ACCURACY, SKETCH_BINS, Distribution, JobStats, _covered, summarize


def exact_quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted list: what query_time reported before the sketch."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def packed_size(d: Distribution) -> int:
    return len(msgpack.packb(d.to_dict()))


def test_a_million_latencies_keep_the_state_bounded_and_quantiles_within_one_percent():
    rng = random.Random(7)
    values = [rng.lognormvariate(-1.5, 0.8) for _ in range(1_000_000)]  # ~0.2 s median, long right tail
    d = Distribution()
    sizes = []
    for k, v in enumerate(values):
        d.add(v)
        if k + 1 in (1_000, 100_000, 1_000_000):
            sizes.append(packed_size(d))
    # The state is the occupied bin range: it grows with the log of the value range, not the count.
    assert max(sizes) < 8_000, sizes
    assert sizes[-1] - sizes[1] < 1_000, sizes
    s = sorted(values)
    summary = d.summary()
    assert summary["count"] == 1_000_000
    exact_of = {"median": (s[499_999] + s[500_000]) / 2} | {f"p{p}": exact_quantile(s, p / 100) for p in (90, 95, 99)}
    for key, exact in exact_of.items():
        assert abs(summary[key] - exact) <= RELATIVE_ACCURACY * exact, (key, summary[key], exact)
    mean = math.fsum(values) / len(values)
    assert summary["avg"] == pytest.approx(mean, rel=1e-9)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    assert summary["std"] == pytest.approx(std, rel=1e-6)


def test_weighted_adds_equal_repeated_adds_and_absurd_values_are_ignored():
    a, b = Distribution(), Distribution()
    for v, n in ((0.5, 16), (1.25, 3), (0.0, 2), (7.0, 1)):
        a.add(v, n)
        for _ in range(n):
            b.add(v)
    for bad in (math.nan, math.inf, -math.inf):
        a.add(bad, 5)
    a.add(1.0, 0)
    assert a.summary() == pytest.approx(b.summary())
    assert a.summary()["count"] == 22
    assert a.min == 0.0 and a.max == 7.0
    a.add(-3.0)  # a negative latency (clock step) counts as 0, it cannot poison the sketch
    assert a.min == 0.0 and a.count == 23


def test_summary_of_nothing_is_nan_and_summarize_accepts_plain_values():
    empty = Distribution().summary()
    assert empty["count"] == 0 and all(math.isnan(empty[k]) for k in ("avg", "std", "median", "p99"))
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["count"] == 4 and s["avg"] == 2.5 and s["std"] == pytest.approx(statistics.pstdev([1, 2, 3, 4]))
    assert s["p99"] == pytest.approx(4.0, rel=RELATIVE_ACCURACY)  # nearest rank, as before the sketch
    assert s["median"] == pytest.approx(2.5, rel=RELATIVE_ACCURACY)  # mean of the two middle values
    assert summarize([5.0])["p90"] == 5.0 and summarize([5.0])["std"] == 0.0


def test_cumulative_buckets_count_values_up_to_each_bound():
    d = Distribution()
    for v, n in ((0.0, 1), (0.03, 10), (0.2, 5), (3.0, 2)):
        d.add(v, n)
    assert d.cumulative([0.0, 0.05, 0.1, 0.25, 2.5, 5.0]) == [1, 11, 11, 16, 16, 18]


def test_job_stats_survive_snapshot_through_msgpack():
    st = JobStats("j1")
    rng = random.Random(3)
    t = 1000.0
    for _ in range(5_000):
        lat = rng.uniform(0.05, 2.0)
        t += 0.01
        st.record(8, 1, lat, lat / 2, t, "w1")
    wire = msgpack.unpackb(msgpack.packb(st.snapshot()), strict_map_key=False)
    back = JobStats.restore(wire)
    assert back.latencies.summary() == pytest.approx(st.latencies.summary())
    assert back.compute.summary() == pytest.approx(st.compute.summary())
    assert (back.latencies.count, back.errors) == (40_000, 5_000)
    # the restored sketch keeps counting like the original
    st.record(4, 0, 9.0, 1.0, t + 1)
    back.record(4, 0, 9.0, 1.0, t + 1)
    assert back.latencies.summary() == pytest.approx(st.latencies.summary())
    assert len(st.recent_latencies()) == 20_000


def test_a_snapshot_from_before_the_sketch_restores_its_values():
    old = {"job_id": "j", "completed": 3, "errors": 0, "first_result": 1.0, "latencies": [0.1, 0.2, 0.3],
           "compute": [0.01, 0.02, 0.03], "history": [], "spans": [], "started": 0.5}
    st = JobStats.restore(old)
    assert st.latencies.count == 3 and st.latencies.mean == pytest.approx(0.2)
    assert st.compute.summary()["median"] == pytest.approx(0.02, rel=RELATIVE_ACCURACY)


def test_the_bin_count_is_capped_whatever_the_value_range():
    d = Distribution()
    for k in range(20_000):
        d.add(10 ** (-9 + 21 * k / 20_000))  # 1 ns .. 1e12 s: more 1 % bins than the cap
    assert len(d.to_dict()["bins"]) <= SKETCH_BINS
    assert d.quantile(0.99) == pytest.approx(10 ** (-9 + 21 * 0.99), rel=RELATIVE_ACCURACY)  # the top keeps 1 %


def test_the_prometheus_histogram_is_counted_from_the_sketch():
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from broker.metrics import CoordinatorCollector  # noqa: PLC0415

    d = Distribution()
    for v, n in ((0.03, 10), (0.2, 5), (3.0, 2)):
        d.add(v, n)
    job = {"model": "m", "completed": 17, "errors": 0, "pending": 0, "in_flight": 0, "batch_size": 4,
           "latency": d.to_dict()}
    snap = {"jobs": {"j": job}, "rates": {"j": {"rate": 1.0}}, "members": [], "busy_seconds": {},
            "failures_detected": 0, "loop_stall_max": 0.0, "slowest_message": ["", 0.0], "heartbeat_gap_max": 0.0,
            "sdfs": {"files": 0, "under_replicated": 0}, "role": "primary", "term": 1}
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(lambda: snap))
    labels = {"job": "j", "model": "m"}
    buckets = [registry.get_sample_value("idunno_query_latency_seconds_bucket", labels | {"le": le})
               for le in ("0.05", "0.25", "2.5", "5.0", "+Inf")]
    assert buckets == [10, 15, 15, 17, 17]
    assert registry.get_sample_value("idunno_query_latency_seconds_sum", labels) == pytest.approx(7.3)


def test_a_rate_window_that_ends_before_the_pieces_being_computed_is_not_biased_low():
    """Three workers each finish one 0.7 s image after another, staggered: 3 / 0.7 images/s. A
    window ending now misses the part of each image still being computed (about 1.1 images of 43);
    ending one longest piece earlier, it misses none."""
    stats = JobStats("j")
    stats.first_dispatch = 0.0
    true_rate = 3 / 0.7
    ends = sorted((0.7 * w / 3 + 0.7 * (k + 1), w) for w in range(3) for k in range(85))  # staggered
    for end, w in ends:
        if end <= 60.0:
            stats.record(1, 0, 0.7, 0.7, end, f"w{w}")
    now = 60.0
    lag = stats.longest_piece(now, 10.0)
    assert lag == pytest.approx(0.7)
    assert stats.rate(now, 10.0) < 0.98 * true_rate  # biased low by the images in progress (2.7 %)
    assert stats.rate(now, 10.0, lag) == pytest.approx(true_rate, rel=0.01)
    # Ends stay in order (the scans stop at the first piece before their window): a result stamped
    # before the last one (a new primary's clock behind the old one's) is taken as ending with it.
    stats.record(1, 0, 0.7, 0.7, 59.0, "w0")
    assert stats.history[-1].end == stats.history[-2].end == max(e for e, _ in ends if e <= 60.0)
    # A young job: the window starts at its first dispatch, and never ends before its first result.
    young = JobStats("y")
    young.first_dispatch = 0.0
    young.record(1, 0, 0.7, 0.7, 0.7)
    assert young.rate(0.8, 10.0, 0.7) == pytest.approx(1 / 0.7)


def test_a_tapered_window_is_the_mean_of_the_square_windows_over_its_ramp():
    """images_tapered computes, in one pass, what averaging images_between over every window start
    in the ramp gives (checked against 4,001 evenly spaced starts, on random pieces)."""
    rng = random.Random(7)
    for _ in range(40):
        stats = JobStats("j")
        t = 0.0
        while t < 30.0:
            t += rng.uniform(0.0, 0.8)
            elapsed = rng.uniform(1e-3, 1.5)
            stats.record(rng.randint(1, 8), 0, elapsed, elapsed, t)
        width, ramp = rng.uniform(1.0, 12.0), rng.uniform(0.05, 8.0)  # (a ramp longer than the window too)
        u0 = rng.uniform(0.0, 30.0 - width - ramp)
        k = 4001
        brute = sum(stats.images_between(u0 + ramp * i / (k - 1), u0 + ramp * i / (k - 1) + width)
                    for i in range(k)) / k
        assert stats.images_tapered(u0, u0 + ramp, width) == pytest.approx(brute, rel=1e-3, abs=1e-6)
    # An empty piece counts by the share of windows that hold its instant (no division by zero).
    assert _covered(5.0, 5.0, 4.0, 6.0, 3.0) == pytest.approx(0.5)
    assert _covered(9.5, 9.5, 4.0, 6.0, 3.0) == 0.0


def _bursts(period: float, pieces: int, images: int, piece: float, until: float = 80.0) -> JobStats:
    """A job served every ``period`` seconds in a burst of ``pieces`` back-to-back pieces."""
    stats = JobStats("j")
    stats.first_dispatch = 0.0
    t = 0.0
    while t + period <= until:
        for i in range(pieces):
            stats.record(images, 0, 0.1, piece, t + piece * (i + 1))
        t += period
    return stats


def test_a_job_served_in_bursts_reads_level_through_tapered_edges():
    """A cheap model sharing its one worker with 0.7 s images: every 0.7 s a burst of 3 images
    computed in 0.12 s (3 / 0.7 images/s). As a square window's edge crosses a burst its rate
    moves by 3 images of 43 (7 %); faded over one long piece (the lag), by well under 1 %."""
    stats = _bursts(period=0.7, pieces=3, images=1, piece=0.04)
    true_rate = 3 / 0.7
    square = [stats.rate(40.0 + d / 50, 10.0, 0.7) for d in range(50)]
    tapered = [stats.rate(40.0 + d / 50, 10.0, 0.7, 0.7) for d in range(50)]
    spread = [(max(x) - min(x)) / true_rate for x in (square, tapered)]
    assert spread[0] > 0.05 and spread[1] < 0.01, spread
    assert statistics.mean(tapered) == pytest.approx(true_rate, rel=0.005)
    # A job younger than its window plus the ramp keeps square edges (its window is its age).
    assert stats.rate(10.3, 10.0, 0.0, 0.7) == stats.rate(10.3, 10.0)


def _gap_starts_by_merging(stats: JobStats, now: float, window: float, least: float | None = None) -> list[float]:
    """The gaps of the union of the pieces ending in the window, the plain way (sort by start,
    merge), that last at least ``least`` (default: the median piece)."""
    spans = sorted((c.start, c.end) for c in stats.history if c.end > now - window)
    typical = statistics.median(b - a for a, b in spans) if least is None else least
    starts, reach = [], spans[0][1]
    for a, b in spans[1:]:
        if a > reach + 1e-9 and a - reach >= typical:
            starts.append(reach)
        reach = max(reach, b)
    return starts


def test_the_burst_period_is_the_median_over_time_of_the_cycles_between_gaps_of_the_union():
    """burst_period's one backward pass finds exactly the gaps (of at least a median piece) that
    merging the pieces finds, on random pieces of several workers overlapping each other; its
    value is the cycle length (gap start to gap start) that half of the cycles' time is in cycles
    at least as long as."""
    rng = random.Random(11)
    for _ in range(60):
        stats = JobStats("j")
        t = 0.0
        while t < 40.0:
            t += rng.expovariate(rng.choice((2.0, 20.0)))
            elapsed = rng.uniform(1e-3, rng.choice((0.05, 1.5)))
            stats.record(rng.randint(1, 4), 0, elapsed, elapsed, t, f"w{rng.randint(0, 3)}")
        now, window = t, rng.uniform(3.0, 30.0)
        starts = _gap_starts_by_merging(stats, now, window)
        cycles = sorted((b - a for a, b in zip(starts, starts[1:], strict=False)), reverse=True)
        if len(starts) < 2:
            assert stats.burst_period(now, window) == 0.0
            continue
        period = stats.burst_period(now, window)
        assert period in cycles
        assert sum(c for c in cycles if c >= period) >= sum(cycles) / 2
        assert sum(c for c in cycles if c > period) < sum(cycles) / 2


def test_a_job_served_in_bursts_reads_level_with_edges_faded_over_its_burst_period():
    """The shape bench/pools.py showed under load: a cheap model shares its worker with 0.5 s
    images, and is served every 1.3 s in a burst of 3 batches of 2 (0.06 s each). Faded over one
    long piece (0.5 s) its 10 s rate still moves by a batch as an edge crosses a burst; faded over
    its burst period, which burst_period finds, by well under 1 %. A job computed back to back
    (a 2 ms round trip between pieces), by one worker or by two with a rare short gap in their
    union, has no burst period: its edges fade over the long piece as before."""
    stats = _bursts(period=1.3, pieces=3, images=2, piece=0.06)
    true_rate = 6 / 1.3
    period = stats.burst_period(60.0, 10.0)
    assert period == pytest.approx(1.3)
    long_piece = [stats.rate(40.0 + d / 50, 10.0, 0.5, 0.5) for d in range(65)]
    faded = [stats.rate(40.0 + d / 50, 10.0, 0.5, period) for d in range(65)]
    spread = [(max(x) - min(x)) / true_rate for x in (long_piece, faded)]
    assert spread[0] > 0.05 and spread[1] < 0.01, spread
    assert statistics.mean(faded) == pytest.approx(true_rate, rel=0.005)
    steady = JobStats("s")
    for k in range(1, 200):
        steady.record(2, 0, 0.12, 0.098, 0.1 * k)  # (2 ms between pieces: the next task's round trip)
    assert steady.burst_period(20.0, 10.0) == 0.0
    two, t = JobStats("t"), 0.0  # two workers, 0.5 s pieces; every 3 s both pause for 5 ms
    for k in range(80):
        t += 0.005 if k % 6 == 0 else 0.0
        for w in (0, 1):
            two.record(1, 0, 0.5, 0.5, t + 0.5, f"w{w}")
        t += 0.5
    assert len(_gap_starts_by_merging(two, 40.0, 10.0)) == 0 < len(_gap_starts_by_merging(two, 40.0, 10.0, 0.0))
    assert two.burst_period(40.0, 10.0) == 0.0
