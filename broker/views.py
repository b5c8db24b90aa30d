"""Read-only command views: what a client (or the metrics collector) is shown of the state.

Every ``cmd_*`` here only reads; the commands that change state live in :mod:`broker.control`.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from broker.jobs import Job, JobState
from broker.stats import rate_gap, summarize
from common.modelnames import NOOP
from common.protocol import ErrorCode

if TYPE_CHECKING:
    from broker.coordinator import Coordinator


class CommandError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Views:
    def __init__(self, core: Coordinator) -> None:
        self.core = core
        self.cfg = core.cfg

    @property
    def jobs(self) -> Any:
        return self.core.state.jobs

    def job(self, args: dict[str, Any]) -> Job:
        job_id = args.get("job")
        if not isinstance(job_id, str) or job_id not in self.jobs.jobs:
            known = ", ".join(self.jobs.jobs) or "none"
            raise CommandError(ErrorCode.NOT_FOUND, f"no such job {job_id!r} (jobs: {known})")
        return self.jobs.jobs[job_id]

    def selected(self, args: dict[str, Any]) -> list[Job]:
        return [self.job(args)] if args.get("job") else list(self.jobs.jobs.values())

    def cmd_info(self, args: dict[str, Any], now: float) -> Any:
        c = self.core
        return {"sdfs": c.master.info(), "members": len(c.registry.alive()), "term": c.term,
                "role": c.role, "failures_detected": c.membership.failures_detected, "dropped": dict(c.dropped),
                "loop_stall_max": round(c.max_stall, 3), "heartbeat_gap_max": round(c.registry.max_gap(), 3),
                "slowest_message": {"type": c.slowest[0], "seconds": round(c.slowest[1], 4)},
                "state_store": c.store.info() if c.store is not None else None}

    def cmd_pending(self, args: dict[str, Any], now: float) -> Any:
        return {
            j.job_id: {"pending": [j.qid(i) for i in itertools.islice(j.pending, 200)],
                       "pending_count": len(j.pending), "in_flight": self.jobs.in_flight(j.job_id),
                       "state": str(j.state)}
            for j in self.selected(args)
        }

    def cmd_completed(self, args: dict[str, Any], now: float) -> Any:
        return {
            j.job_id: {"completed": j.completed, "total": j.total, "errors": j.stats.errors,
                       "model": j.model, "state": str(j.state)}
            for j in self.selected(args)
        }

    def cmd_jobs(self, args: dict[str, Any], now: float) -> Any:
        loaded = {m for s in self.core.dispatcher.slots.values() for m in s.models}
        return [j.describe() | {"loading": self._loading(j, loaded)} for j in self.jobs.jobs.values()]

    @staticmethod
    def _loading(job: Job, loaded: set[str]) -> bool:
        """The job waits for its model: unfinished, nothing answered yet, and no worker reports the
        model loaded (warm start: Preload on submit; docs/models.md)."""
        return (job.state in (JobState.QUEUED, JobState.RUNNING) and not job.completed
                and job.model != NOOP and job.model not in loaded)

    def rate_lag(self, clock: float) -> float:
        """How far the rate windows end before now: the longest piece the running jobs computed in
        the last window (each job's 90th percentile), at most a quarter of the window; 0 while no
        job runs. A window ending now misses the part of each piece still being computed, so a
        model whose pieces take 0.7 s showed 3 % below its real rate beside 0.05 s ones (simulated
        6 jobs, every worker serving all: 4.6 % median gap instead of 2.3 %); all jobs share one
        lag, so their windows cover the same seconds."""
        short = self.cfg.rate_window
        longest = max((j.stats.longest_piece(clock, short) for j in self.jobs.running()), default=0.0)
        return min(longest, short / 4)

    def rate_ramp(self, clock: float, lag: float) -> float:
        """How far the rate windows' edges fade (JobStats.rate's ``ramp``): the granularity at which
        the running jobs are served, one long piece (``lag``) or, for a job served in bursts, the
        time from one burst to the next (JobStats.burst_period), whichever is longer; at most a
        quarter of the window, like the lag, and shared by all jobs so their windows weigh the
        same seconds alike. With pools of 2 a cheap model shares its one worker with vgg16 and
        is served about every 1.3 s, in bursts of 3 batches, on a machine under load; faded over
        one 0.5 s piece only, its 10 s rate moved by a batch as an edge crossed a burst
        (bench/pools.py under hog.py: 6.2-6.7 % median gap, 0.6-2.0 % without pools)."""
        short = self.cfg.rate_window
        period = max((j.stats.burst_period(clock, short) for j in self.jobs.running()), default=0.0)
        return min(max(lag, period), short / 4)


    def cmd_query_rate(self, args: dict[str, Any], now: float) -> Any:
        jobs = self.selected(args)
        short, long = self.cfg.rate_window, self.cfg.rate_window_long
        clock = self.core.clock()
        lag = self.rate_lag(clock)
        ramp = self.rate_ramp(clock, lag)
        # Both windows end `lag` ago and their edges fade over `ramp` (JobStats.rate).
        rates = {j.job_id: {"rate": j.stats.rate(clock, short, lag, ramp), "count": j.completed, "window": short,
                            "rate_long": j.stats.rate(clock, long, lag, ramp), "window_long": long,
                            "lag": round(lag, 3), "ramp": round(ramp, 3),
                            "model": j.model, "overall": j.stats.overall_rate(), "state": str(j.state),
                            "duplicates": j.stats.duplicates}
                 for j in jobs}
        running = [j.job_id for j in jobs if j.state is JobState.RUNNING]
        return {"jobs": rates, "gap": rate_gap([rates[j]["rate"] for j in running]),
                "gap_long": rate_gap([rates[j]["rate_long"] for j in running])}

    def cmd_query_time(self, args: dict[str, Any], now: float) -> Any:
        return {
            j.job_id: {"latency": summarize(j.stats.latencies), "compute": summarize(j.stats.compute),
                       "model": j.model}
            for j in self.selected(args)
        }

    def cmd_results(self, args: dict[str, Any], now: float) -> Any:
        job = self.job(args)
        limit = int(args.get("limit") or 0)
        after = args.get("after")
        if after is None:  # by query index
            keys = sorted(job.results)
            keys = keys[:limit] if limit > 0 else keys
            return {"job": job.describe(), "results": [job.row(i) for i in keys], "sdfs_name": f"results/{job.job_id}"}
        # In completion order from a cursor: results are only ever appended, on the standby in the
        # same order, so a client resumes with ``next`` after a failover without gaps or repeats.
        after = max(0, int(after))
        end = job.completed if limit <= 0 else min(job.completed, after + limit)
        items = [job.row(i) for i in itertools.islice(job.results, after, end)]
        return {"job": job.describe(), "results": items, "sdfs_name": f"results/{job.job_id}",
                "next": after + len(items), "in_flight": self.jobs.in_flight(job.job_id)}

    def cmd_vm_info(self, args: dict[str, Any], now: float) -> Any:
        c = self.core
        out = {}
        for m in c.registry.alive("worker"):
            slot = c.dispatcher.slots.get(m.node_id)
            out[m.node_id] = {
                "models": list(slot.models) if slot is not None else [],
                "pool": sorted(c.dispatcher.pools.of(m.node_id)),  # models it is assigned (broker/pools.py)
                "credit": slot.credit if slot is not None else 0,
                # Memory as the worker reports it (MB; 0: not reported): RSS now and at its peak,
                # its model memory budget and each loaded model's size.
                "rss_mb": slot.rss_mb if slot is not None else 0,
                "peak_rss_mb": slot.peak_rss_mb if slot is not None else 0,
                "budget_mb": slot.budget_mb if slot is not None else 0,
                "model_mb": dict(slot.model_mb) if slot is not None else {},
                "cost_per_image": c.state.costs.of_worker(m.node_id),
                "tasks": [{"task_id": t.task_id, "job": t.job_id, "queries": [f"{t.job_id}:{i}" for i in t.indexes]}
                          for t in self.jobs.tasks_of(m.node_id)],
            }
        return out

    def cmd_members(self, args: dict[str, Any], now: float) -> Any:
        c = self.core
        return {"seq": c.registry.seq, "members": c.registry.view(),
                "coordinator": {"addr": c.addr, "role": c.role, "term": c.term, "state_seq": c.state_seq,
                                "synced": c.is_primary or c.synced}}

    def cmd_timeline(self, args: dict[str, Any], now: float) -> Any:
        return {
            "jobs": {
                j.job_id: {
                    "model": j.model,
                    "rates": j.stats.series(self.cfg.rate_window),
                    "latencies": j.stats.recent_latencies(),
                    "spans": [[sp.worker, sp.start, sp.end, sp.n] for sp in j.stats.spans],
                }
                for j in self.selected(args)
            },
            "events": self.core.state.events[-1000:],
            "window": self.cfg.rate_window,
        }

    def cmd_status(self, args: dict[str, Any], now: float) -> Any:
        return {
            "members": self.cmd_members({}, now),
            "jobs": self.cmd_jobs({}, now),
            "rates": self.cmd_query_rate({}, now),
            "times": self.cmd_query_time({}, now),
            "vm_info": self.cmd_vm_info({}, now),
            "sdfs": self.core.master.info(),
            "events": self.core.state.events[-200:],
            "cost": self.core.state.costs.per_model(),
        }

    def metrics_snapshot(self, now: float) -> dict[str, Any]:
        """Plain data for the Prometheus collector, built on the loop thread (no shared mutable state)."""
        c = self.core
        return {
            "rates": self.cmd_query_rate({}, now)["jobs"],
            "jobs": {
                j.job_id: {"model": j.model, "completed": j.completed, "errors": j.stats.errors,
                           "pending": len(j.pending), "in_flight": self.jobs.in_flight(j.job_id),
                           "batch_size": j.batch_size, "duplicates": j.stats.duplicates,
                           "latency": j.stats.latencies.to_dict()}
                for j in self.jobs.jobs.values()
            },
            "members": [m.public() for m in c.registry.members.values()],
            "busy_seconds": dict(c.state.busy_seconds),
            "failures_detected": c.membership.failures_detected,
            "loop_stall_max": c.max_stall,
            "slowest_message": c.slowest,
            "heartbeat_gap_max": c.registry.max_gap(),
            "dropped": dict(c.dropped),
            "sdfs": c.master.info(),
            "role": c.role,
            "term": c.term,
        }
