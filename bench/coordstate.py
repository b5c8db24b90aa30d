"""Cost of the durable coordinator state (broker/state_store.py), in one process, no cluster.

(a) the loop's cost of journaling: ops applied (task.dispatch + task.result of a batch of 8, as the
    primary emits them) with the state store and a commit per iteration of 10 such pairs, against
    the same ops with no store (memory only);
(b) compaction of a large state (``--jobs`` jobs x ``--results`` results each): time the loop spends
    building the snapshot items, time the compaction thread takes, and the longest commit of the
    loop while the compaction runs (the loop keeps appending and committing every 2 ms);
(c) start-up: ``load_state`` of that state (snapshot + journal tail) in a fresh coordinator.

    .venv/bin/python bench/coordstate.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import benchlib  # noqa: F401 - fixes sys.path first
from rich.console import Console
from rich.table import Table

from broker.coordinator import PRIMARY, STANDBY, Coordinator
from broker.jobs import Job
from broker.state_store import StateStore
from common.config import Config


class NullNet:
    def send(self, identity, msg):
        return True

    def publish(self, topic, msg):
        pass


def make(store: StateStore | None) -> Coordinator:
    cfg = Config(state_compact_ops=10**9)
    return Coordinator(cfg, "bench:1", NullNet(), role=PRIMARY, store=store)


def add_job(core: Coordinator, n: int, k: int) -> Job:
    job = Job(f"job{k}-noop", "noop", [(f"in/f{i:06d}", 1) for i in range(n)], 8, submitted=time.time())
    core.emit("job.add", job.snapshot(), 0.0)
    core.emit("job.start", {"job_ids": [job.job_id], "ts": time.time()}, 0.0)
    return core.jobs.jobs[job.job_id]


def run_batches(core: Coordinator, job: Job, batches: int, commit_every: int = 10,
                pause: float = 0.0) -> list[float]:
    """Dispatch and answer ``batches`` batches of 8; returns the duration of each commit."""
    commits = []
    for b in range(batches):
        idx = [job.pending[i] for i in range(min(8, len(job.pending)))]
        if not idx:
            break
        tid = f"t1.{b}-{job.job_id}"
        core.emit("task.dispatch", {"task_id": tid, "job_id": job.job_id, "worker": "w@1", "indexes": idx,
                                    "dispatched": time.time()}, 0.0)
        res = {str(i): {"top5": [["noop", 1.0]], "error": None, "worker": "w@1", "batch": 8,
                        "completed_at": time.time(), "latency": 0.01}
               for i in idx}
        core.emit("task.result", {"task_id": tid, "job_id": job.job_id, "results": res, "latency": 0.01,
                                  "elapsed": 0.005, "ts": time.time(), "worker": "w@1"}, 0.0)
        if (b + 1) % commit_every == 0:
            t0 = time.perf_counter()
            core.commit()
            commits.append(time.perf_counter() - t0)
            if pause:
                time.sleep(pause)  # the loop's other work between two commits
    core.commit()
    return commits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--results", type=int, default=2000)
    a = ap.parse_args()
    if a.quick:
        a.jobs, a.results = 10, 500
    batches = 500 if a.quick else 3000
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        # (a) journaling cost against memory only
        base = make(None)
        job = add_job(base, batches * 8, 0)
        t0 = time.perf_counter()
        run_batches(base, job, batches)
        mem = time.perf_counter() - t0
        store = StateStore(Path(tmp) / "a.sqlite")
        core = make(store)
        job = add_job(core, batches * 8, 0)
        t0 = time.perf_counter()
        commits = run_batches(core, job, batches)
        dur = time.perf_counter() - t0
        store.close()
        t = Table(title="(a) journaling on the loop (2 ops per batch of 8, commit every 10 batches)")
        for col in ("", "ops", "total s", "us per op", "commit p50 ms", "commit max ms"):
            t.add_column(col)
        ops = 2 * batches
        commits.sort()
        t.add_row("memory only (baseline)", str(ops), f"{mem:.3f}", f"{mem / ops * 1e6:.1f}", "-", "-")
        t.add_row("state store", str(ops), f"{dur:.3f}", f"{dur / ops * 1e6:.1f}",
                  f"{commits[len(commits) // 2] * 1e3:.2f}", f"{commits[-1] * 1e3:.2f}")
        console.print(t)

        # (b) compaction of a large state while the loop goes on
        path = Path(tmp) / "b.sqlite"
        store = StateStore(path)
        core = make(store)
        for k in range(a.jobs):
            run_batches(core, add_job(core, a.results, k + 1), a.results // 8 + 1)
        live = add_job(core, 100_000, 0)  # a big job still running
        t0 = time.perf_counter()
        items = core.durable_items()
        build = time.perf_counter() - t0
        store.compact(core.state_seq, core.term, items)
        t1 = time.perf_counter()
        during: list[float] = []
        while store.compacting:
            during += run_batches(core, live, 10, commit_every=1, pause=0.002)
            store.poll()
        wall = time.perf_counter() - t1
        stats = store.stats
        run_batches(core, live, 200)  # a journal tail after the snapshot
        t0 = time.perf_counter()
        again = core.durable_items()  # the next compaction: the finished jobs' items are re-used
        build2 = time.perf_counter() - t0
        store.compact(core.state_seq, core.term, again)
        store.wait_idle(120)
        run_batches(core, live, 200)
        store.close()
        size = sum(f.stat().st_size for f in Path(tmp).glob("b.sqlite*"))
        t = Table(title=f"(b) compaction of {a.jobs} jobs x {a.results} results")
        for col in ("snapshot MB", "loop: build items ms (next)", "thread: write s", "loop commits during",
                    "commit p50 ms", "commit max ms", "db file MB"):
            t.add_column(col)
        during.sort()
        t.add_row(f"{stats.last_bytes / 1e6:.1f}", f"{build * 1e3:.0f} ({build2 * 1e3:.0f})",
                  f"{stats.last_seconds:.2f} ({wall:.2f} wall)",
                  str(len(during)), f"{during[len(during) // 2] * 1e3:.2f}" if during else "-",
                  f"{during[-1] * 1e3:.1f}" if during else "-", f"{size / 1e6:.1f}")
        console.print(t)

        # (c) start-up from it
        store = StateStore(path)
        fresh = Coordinator(Config(), "bench:1", NullNet(), role=STANDBY, store=store)
        t0 = time.perf_counter()
        info = fresh.load_state(0.0)
        load = time.perf_counter() - t0
        store.close()
        t = Table(title="(c) start-up: load_state (snapshot + journal tail)")
        for col in ("jobs", "ops replayed", "seconds"):
            t.add_column(col)
        t.add_row(str(info["jobs"]), str(info["ops"]), f"{load:.2f}")
        console.print(t)
    ratio = dur / mem if mem else float("nan")
    console.print(f"HEADLINE: journaling cost = {ratio:.2f}x the memory-only loop "
                  f"({dur / ops * 1e6:.0f} vs {mem / ops * 1e6:.0f} us per op); compaction held the loop "
                  f"{build * 1e3:.0f} ms (next ones {build2 * 1e3:.0f} ms) + longest commit "
                  f"{during[-1] * 1e3 if during else 0:.0f} ms")


if __name__ == "__main__":
    main()
