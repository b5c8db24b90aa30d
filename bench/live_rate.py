"""The live `query_rate` as a user watches it: AlexNet + ResNet-50, sampled through the CLI.

Two jobs over the same inputs (batch 8 each) start together on a 4-worker cluster with both models
preloaded. Every ``--every`` seconds, from ``--from`` seconds after start until the first job ends,
the benchmark runs ``idunno ctl --json query_rate`` (a new process, as a user's script would) and
records the rate gap ``(max - min) / max`` of the running jobs, and the CLI call's wall time.

Throughput is both jobs' completed images over the time until the first job ended. Modes in
the same run: streamed results with the prefetched batch bound at once, and with late binding
(the default). Baseline (same run, same machine): the previous behaviour — results only when a whole batch is done,
the prefetched batch bound to a job at once, no slow start (``IDUNNO_STREAM_INTERVAL=0``,
``IDUNNO_PREFETCH_LEAD=1e9``, ``IDUNNO_SLOW_START=0``). Also reported: each job's first result after
start, as the CLI sees it (``completed`` polled every 0.1 s).

    .venv/bin/python bench/live_rate.py [--quick] [--inputs 600] [--workers 4]
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
OLD = {"IDUNNO_STREAM_INTERVAL": "0", "IDUNNO_PREFETCH_LEAD": "1e9", "IDUNNO_SLOW_START": "0"}


def cli_query_rate(cluster: LocalCluster) -> tuple[dict[str, Any], float]:
    env = dict(os.environ, IDUNNO_COORDINATOR=cluster.coordinator, IDUNNO_STANDBY=cluster.standby_addr,
               IDUNNO_DATA_DIR=cluster.data_dir)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "cli.main", "ctl", "--json", "query_rate"], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout), time.monotonic() - t0


def run(cluster: LocalCluster, copies: int, start_after: float, every: float, workers: int) -> dict[str, Any]:
    wait_models(cluster, list(MODELS), workers)
    n_inputs, _ = put_copies(cluster, copies)
    jobs = [cluster.ctl("submit", model=m, inputs="copies/", batch=8)["job_id"] for m in MODELS]
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
    gaps, walls = [], []
    next_sample = t_start + start_after
    while True:
        time.sleep(max(0.0, next_sample - time.monotonic()))  # a sampling clock, not synchronisation
        next_sample += every
        data, wall = cli_query_rate(cluster)
        if any(data["jobs"][j]["state"] != "running" for j in jobs):
            break
        gaps.append(data["gap"])
        walls.append(wall)
    elapsed = time.monotonic() - t_start
    done = cluster.ctl("completed", timeout=5.0)
    return {"gaps": gaps, "walls": walls, "first": [first[j] for j in jobs], "inputs": n_inputs,
            "elapsed": elapsed, "throughput": sum(done[j]["completed"] for j in jobs) / elapsed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 inputs per job, sampling from 10 s")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--copies", type=int, default=None, help="copies of the 100 images (default 6 = 600 inputs)")
    ap.add_argument("--from", dest="start", type=float, default=None, help="first sample, s after start (15)")
    ap.add_argument("--every", type=float, default=2.0)
    args = ap.parse_args()
    copies = args.copies or (3 if args.quick else 6)
    start_after = args.start if args.start is not None else (10.0 if args.quick else 15.0)
    results = {}
    modes = (("old: whole batches", OLD),
             ("streamed, early binding", {"IDUNNO_PREFETCH_LEAD": "1e9"}),
             ("streamed + late binding", {}))
    for name, env in modes:
        console.print(f"{name}: {args.workers} workers, {' + '.join(MODELS)}, batch 8, {copies * 100} inputs each")
        with temp_dir("idunno-bench-live-rate-") as tmp:
            cluster = LocalCluster(workers=args.workers, standby=False, data_dir=str(tmp),
                                   env={"IDUNNO_PRELOAD_MODELS": ",".join(MODELS), **env})
            with running(cluster, timeout=180):
                results[name] = run(cluster, copies, start_after, args.every, args.workers)
    rows = []
    for name, r in results.items():
        g = r["gaps"] or [float("nan")]
        rows.append([name, len(r["gaps"]), statistics.median(g) * 100, max(g) * 100,
                     sum(x > 0.2 for x in r["gaps"]), r["first"][0], r["first"][1],
                     statistics.median(r["walls"]) if r["walls"] else float("nan"), r["throughput"],
                     r["throughput"] / results["old: whole batches"]["throughput"]])
    table(f"live query_rate gap, sampled every {args.every:g} s from {start_after:g} s by `idunno ctl --json "
          f"query_rate` until the first job ends",
          ["mode", "samples", "gap median %", "gap max %", "samples > 20 %", f"1st result {MODELS[0]} (s)",
           f"1st result {MODELS[1]} (s)", "CLI call (s)", "images/s (both jobs)", "vs old"], rows)
    old, new = results["old: whole batches"], results["streamed + late binding"]
    if old["gaps"] and new["gaps"]:
        m_old, m_new = statistics.median(old["gaps"]), statistics.median(new["gaps"])
        headline(f"live query_rate gap median {m_new * 100:.1f}% (max {max(new['gaps']) * 100:.1f}%) vs "
                 f"{m_old * 100:.1f}% (max {max(old['gaps']) * 100:.1f}%) with whole batches = "
                 f"{ratio(m_new / m_old if m_old else float('inf'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
