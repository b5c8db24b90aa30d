"""``idunno report``: a PNG of a run — rates with the fairness band, latency distribution, worker timeline.

All numbers come from the coordinator's ``timeline`` command (its stats module), so the report
agrees with ``query_rate``, ``query_time``, ``top`` and the metrics endpoint.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

EVENT_COLORS = {"fail": "red", "leave": "orange", "failover": "purple", "job_added": "green", "join": "gray",
                "pool": "teal"}  # pool: workers moved between model pools (broker/pools.py)


def build_figure(timeline: dict[str, Any], band: float = 0.05) -> Figure:
    jobs = timeline["jobs"]
    fig, (ax_rate, ax_lat, ax_work) = plt.subplots(3, 1, figsize=(11, 11), constrained_layout=True)
    t0 = min((s[1] for j in jobs.values() for s in j["spans"]), default=0.0)

    # 1. query rate per job, with the fairness band around the mean of the running jobs
    for job_id, j in jobs.items():
        if j["rates"]:
            ts, rs = zip(*j["rates"], strict=True)
            ax_rate.plot([t - t0 for t in ts], rs, label=f"{job_id} ({j['model']})")
    series = [dict((round(t, 1), r) for t, r in j["rates"]) for j in jobs.values() if j["rates"]]
    common = sorted(set.intersection(*(set(s) for s in series))) if len(series) > 1 else []
    if common:
        mean = [sum(s[t] for s in series) / len(series) for t in common]
        ax_rate.fill_between([t - t0 for t in common], [m * (1 - band) for m in mean], [m * (1 + band) for m in mean],
                             color="gray", alpha=0.25, label=f"fairness band ±{band:.0%}")
    for ev in timeline.get("events", []):
        if ev.get("kind") in EVENT_COLORS and ev.get("ts", 0) >= t0:
            ax_rate.axvline(ev["ts"] - t0, color=EVENT_COLORS[ev["kind"]], linestyle=":", linewidth=1)
            ax_rate.annotate(ev["kind"], (ev["ts"] - t0, 0), rotation=90, fontsize=7, va="bottom")
    ax_rate.set_title(f"query rate (images/s over a {timeline.get('window', 10):.0f} s window)")
    ax_rate.set_xlabel("seconds since first dispatch")
    ax_rate.set_ylabel("images/s")
    ax_rate.legend(loc="upper right", fontsize=8)

    # 2. latency distribution
    for job_id, j in jobs.items():
        if j["latencies"]:
            ax_lat.hist(j["latencies"], bins=30, alpha=0.6, label=job_id)
    ax_lat.set_title("query latency (dispatch to result)")
    ax_lat.set_xlabel("seconds")
    ax_lat.set_ylabel("queries")
    if any(j["latencies"] for j in jobs.values()):
        ax_lat.legend(fontsize=8)

    # 3. worker assignment timeline: one row per worker, one colour per job
    workers = sorted({s[0] for j in jobs.values() for s in j["spans"]})
    row = {w: i for i, w in enumerate(workers)}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (job_id, j) in enumerate(jobs.items()):
        bars = [(s[1] - t0, max(s[2] - s[1], 1e-3)) for s in j["spans"]]
        for w in workers:
            mine = [b for b, s in zip(bars, j["spans"], strict=True) if s[0] == w]
            if mine:
                ax_work.broken_barh(mine, (row[w] - 0.4, 0.8), color=colors[k % len(colors)], alpha=0.7,
                                    label=job_id if w == workers[0] or not ax_work.containers else None)
    ax_work.set_yticks(range(len(workers)), [w.split("@")[0] for w in workers], fontsize=7)
    ax_work.set_title("which worker ran which job (batches in flight)")
    ax_work.set_xlabel("seconds since first dispatch")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k % len(colors)], alpha=0.7) for k in range(len(jobs))]
    if jobs:
        ax_work.legend(handles, list(jobs), fontsize=8, loc="upper right")
    return fig


def write_report(timeline: dict[str, Any], out: str, band: float = 0.05) -> str:
    if not timeline["jobs"]:
        raise ValueError("no jobs to report on")
    fig = build_figure(timeline, band)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
