"""The live `query_rate` as a user watches it: AlexNet + ResNet-50, sampled through the CLI.

Two jobs over the same inputs (batch 8 each) start together on a 4-worker cluster with both models
preloaded. Every ``--every`` seconds, from ``--from`` seconds after start until the first job ends,
the benchmark runs ``idunno ctl --json query_rate`` (a new process, as a user's script would) and
records the rate gap ``(max - min) / max`` of the running jobs, and the CLI call's wall time.

Throughput is both jobs' completed images over the time until the first job ended. Modes
(``--modes``, the first is the ratio column's baseline), each on a fresh cluster in the same run:

- ``old``: the previous behaviour — results only when a whole batch is done, the prefetched batch
  bound to a job at once, no slow start, tasks of the whole batch (``IDUNNO_STREAM_INTERVAL=0``,
  ``IDUNNO_PREFETCH_LEAD=1e9``, ``IDUNNO_SLOW_START=0``, ``IDUNNO_TASK_SECONDS=0``);
- ``early``: streamed results, the prefetched batch bound at once;
- ``credit2``: the defaults but a worker holds at most 2 tasks (the depth before worker_credit 8);
- ``late``: the defaults (streamed results, late binding, tasks bounded by ``task_seconds``);
- ``auto``: the defaults with both jobs on ``--batch auto`` (latency target 1 s).

Also reported: each job's first result after start, as the CLI sees it (``completed`` polled every
0.1 s), and the machine's load average. ``--samples FILE`` keeps every sample (time, both rates and
counts, both gaps) for a closer look at the worst ones.

    .venv/bin/python bench/live_rate.py [--quick] [--copies 6] [--workers 4] [--modes old,early,credit2,late,auto]
                                        [--samples samples.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchlib import console, headline, put_copies, ratio, running, table, temp_dir, wait_models, wait_until

from cli.cluster import LocalCluster

MODELS = ("alexnet", "resnet50")
OLD = {"IDUNNO_STREAM_INTERVAL": "0", "IDUNNO_PREFETCH_LEAD": "1e9", "IDUNNO_SLOW_START": "0",
       "IDUNNO_TASK_SECONDS": "0"}


def cli_query_rate(cluster: LocalCluster) -> tuple[dict[str, Any], float]:
    env = dict(os.environ, IDUNNO_COORDINATOR=cluster.coordinator, IDUNNO_STANDBY=cluster.standby_addr,
               IDUNNO_DATA_DIR=cluster.data_dir)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "cli.main", "ctl", "--json", "query_rate"], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout), time.monotonic() - t0


def run(cluster: LocalCluster, copies: int, start_after: float, every: float, workers: int,
        batch: int | str = 8) -> dict[str, Any]:
    wait_models(cluster, list(MODELS), workers)
    n_inputs, _ = put_copies(cluster, copies)
    jobs = [cluster.ctl("submit", model=m, inputs="copies/", batch=batch)["job_id"] for m in MODELS]
    t_start = time.monotonic()
    cluster.ctl("start")
    first: dict[str, float] = {}

    def firsts() -> bool:
        done = cluster.ctl("completed", timeout=5.0)
        for j in jobs:
            if j not in first and done[j]["completed"] > 0:
                first[j] = time.monotonic() - t_start
        return len(first) == len(jobs)

    wait_until(firsts, 120, 0.1, "first results")
    gaps, walls, samples = [], [], []
    next_sample = t_start + start_after
    while True:
        time.sleep(max(0.0, next_sample - time.monotonic()))  # a sampling clock, not synchronisation
        next_sample += every
        t_call = time.monotonic() - t_start
        data, wall = cli_query_rate(cluster)
        if any(data["jobs"][j]["state"] != "running" for j in jobs):
            break
        gaps.append(data["gap"])
        walls.append(wall)
        samples.append({"t": round(t_call, 2), "gap": data["gap"], "gap_long": data["gap_long"], "wall": wall,
                        "rates": [data["jobs"][j]["rate"] for j in jobs],
                        "counts": [data["jobs"][j]["count"] for j in jobs]})
    elapsed = time.monotonic() - t_start
    done = cluster.ctl("completed", timeout=5.0)
    return {"gaps": gaps, "walls": walls, "samples": samples, "first": [first[j] for j in jobs], "inputs": n_inputs,
            "elapsed": elapsed, "throughput": sum(done[j]["completed"] for j in jobs) / elapsed}


MODES = {  # key: (row name, environment, batch)
    "old": ("old: whole batches", OLD, 8),
    "early": ("streamed, early binding", {"IDUNNO_PREFETCH_LEAD": "1e9"}, 8),
    "credit2": ("streamed + late binding, worker_credit 2", {"IDUNNO_WORKER_CREDIT": "2"}, 8),
    "late": ("streamed + late binding", {}, 8),
    "auto": ("streamed + late binding, --batch auto", {}, "auto"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 inputs per job, sampling from 10 s")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--copies", type=int, default=None, help="copies of the 100 images (default 6 = 600 inputs)")
    ap.add_argument("--from", dest="start", type=float, default=None, help="first sample, s after start (15)")
    ap.add_argument("--every", type=float, default=2.0)
    ap.add_argument("--modes", default="old,early,late,auto", help=f"comma list of {', '.join(MODES)} (the first is "
                    "the baseline of the ratio column)")
    ap.add_argument("--samples", default="", help="write every sample (time, rates, counts, gaps) to this JSON file")
    args = ap.parse_args()
    copies = args.copies or (3 if args.quick else 6)
    start_after = args.start if args.start is not None else (10.0 if args.quick else 15.0)
    keys = [k.strip() for k in args.modes.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODES]
    if unknown or not keys:
        ap.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    results = {}
    for key in keys:
        name, env, batch = MODES[key]
        console.print(f"{name}: {args.workers} workers, {' + '.join(MODELS)}, batch {batch}, {copies * 100} inputs "
                      f"each; load average {os.getloadavg()[0]:.1f}")
        with temp_dir("idunno-bench-live-rate-") as tmp:
            cluster = LocalCluster(workers=args.workers, standby=False, data_dir=str(tmp),
                                   env={"IDUNNO_PRELOAD_MODELS": ",".join(MODELS), **env})
            with running(cluster, timeout=180):
                results[key] = run(cluster, copies, start_after, args.every, args.workers, batch)
        results[key]["load"] = os.getloadavg()[0]
    if args.samples:
        with open(args.samples, "w") as fh:
            json.dump({MODES[k][0]: r for k, r in results.items()}, fh, indent=1)
    base = results[keys[0]]
    rows = []
    for key, r in results.items():
        g = r["gaps"] or [float("nan")]
        gl = [s["gap_long"] for s in r["samples"]] or [float("nan")]
        rows.append([MODES[key][0], len(r["gaps"]), statistics.median(g) * 100, max(g) * 100,
                     sum(x > 0.1 for x in r["gaps"]), max(gl) * 100, r["first"][0], r["first"][1],
                     statistics.median(r["walls"]) if r["walls"] else float("nan"), r["throughput"],
                     r["throughput"] / base["throughput"], r["load"]])
    table(f"live query_rate gap, sampled every {args.every:g} s from {start_after:g} s by `idunno ctl --json "
          f"query_rate` until the first job ends",
          ["mode", "samples", "gap median %", "gap max %", "samples > 10 %", "30 s gap max %",
           f"1st result {MODELS[0]} (s)", f"1st result {MODELS[1]} (s)", "CLI call (s)", "images/s (both jobs)",
           f"vs {keys[0]}", "load avg (1 min)"], rows)
    if "old" in results and "late" in results and results["old"]["gaps"] and results["late"]["gaps"]:
        old, new = results["old"], results["late"]
        m_old, m_new = statistics.median(old["gaps"]), statistics.median(new["gaps"])
        headline(f"live query_rate gap median {m_new * 100:.1f}% (max {max(new['gaps']) * 100:.1f}%) vs "
                 f"{m_old * 100:.1f}% (max {max(old['gaps']) * 100:.1f}%) with whole batches = "
                 f"{ratio(m_new / m_old if m_old else float('inf'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
