"""Model pools (issue #15 acceptance): N classifiers, one job each, workers that may hold 2 of them.

A local cluster of ``--workers`` workers (seeded weights: no internet needed) gets one job per model
over the same ``--inputs`` images from data/, all started together. Two configurations, each on
its own fresh cluster in the same run:

* pools: ``pool_max_models = 2`` (or, with ``--budget-mb``, ``model_memory_mb`` so the pools are
  sized from the memory the workers report; see docs/models.md "Pools");
* baseline: ``pool_max_models = 0`` and no ``model_memory_mb``: every worker may serve (and load)
  every model, what the cluster did before pools.

Measured per configuration: exactly one accepted result per input per job (``ctl results``:
``dispatches``/``arrivals``/``accepted`` per query), peak RSS per worker (the workers' heartbeat
``peak_rss_mb`` and /proc VmHWM of the worker processes), most models held by one worker at a time
(``vm_info`` every ``--sample`` s), the fairness gap among running jobs (``query_rate`` every
``--sample`` s, median and max; also the median of the samples taken once every job has had
results for a whole rate window, the steady state past the model loads, and of the 30 s
window's gap), wall time, and seconds in model loads per job (workers' logs).
The ratios compare pools against the baseline.

    .venv/bin/python bench/pools.py [--models alexnet,resnet18,...] [--inputs 16] [--workers 4] [--trace PREFIX]

``--trace PREFIX`` keeps every sample (each job's rate, count, lag and ramp; each worker's models)
and the coordinator's timeline in PREFIX-pools.json and PREFIX-baseline.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchlib import headline, images, load_seconds, ratio, running, table, temp_dir, vm_hwm_kib, wait_until

from cli.cluster import LocalCluster
from common.modelnames import NOOP
from common.rpc import RpcError

MODELS = "alexnet,resnet18,mobilenet_v3_small,squeezenet1_0,shufflenet_v2_x1_0,vgg16"  # vgg16: 528 MB


def sample(cluster: LocalCluster, seen: dict[str, Any], t: float) -> None:
    """One sample of vm_info (models held, reported peak RSS) and query_rate (the gaps, short and
    long window; a sample counts as steady once every job has had results for a whole window)."""
    try:
        info = cluster.ctl("vm_info", timeout=5.0)
        rates = cluster.ctl("query_rate", timeout=5.0)
    except RpcError:
        return
    for node, d in info.items():
        held = len([m for m in d["models"] if m != NOOP])
        seen["held"][node] = max(seen["held"].get(node, 0), held)
        seen["peak"][node] = max(seen["peak"].get(node, 0), d.get("peak_rss_mb", 0))
        seen["budget"][node] = d.get("budget_mb", 0)
    if seen["all_first"] is None and all(r["count"] > 0 for r in rates["jobs"].values()):
        seen["all_first"] = t
    if seen["samples"] is not None:  # --trace: every sample as it came, for a look at the swings
        seen["samples"].append({"t": round(t, 2), "gap": rates["gap"], "jobs": {
            r["model"]: {k: r[k] for k in ("state", "count", "rate", "lag", "ramp") if k in r}
            for r in rates["jobs"].values()}, "models": {node: d["models"] for node, d in info.items()}})
    if sum(1 for r in rates["jobs"].values() if r["state"] == "running") >= 2:
        seen["gaps"].append(rates["gap"])
        seen["gaps_long"].append(rates["gap_long"])
        window = next(iter(rates["jobs"].values()))["window"]  # query_rate's short window (rate_window)
        if seen["all_first"] is not None and t >= seen["all_first"] + window:
            seen["steady"].append(rates["gap"])
            running = {r["model"]: r["rate"] for r in rates["jobs"].values() if r["state"] == "running"}
            mean = sum(running.values()) / len(running)
            for model, rate in running.items():  # who is ahead or behind, sample by sample
                seen["relative"].setdefault(model, []).append(rate / mean if mean > 0 else 1.0)


def exactly_once(cluster: LocalCluster, job: str, n: int) -> tuple[bool, int]:
    """Every input answered, each accepted once; and how many arrivals were duplicates."""
    rows = cluster.ctl("results", job=job, timeout=10.0)["results"]
    ok = len(rows) == n and all(r.get("accepted") == 1 and not r.get("error") for r in rows)
    return ok, sum(max(0, r.get("arrivals", 1) - 1) for r in rows)


def run(name: str, env: dict[str, str], names: list[str], n_inputs: int, workers: int, step: float,
        timeout: float, trace: str = "") -> dict[str, Any]:
    with temp_dir(f"idunno-bench-pools-{name}-") as tmp:
        cluster = LocalCluster(workers=workers, standby=False, data_dir=str(tmp), env=env)
        with running(cluster, timeout=120):
            from sdfs.client import SdfsClient  # noqa: PLC0415

            with SdfsClient(cluster.config()) as client:
                files = images()  # beyond data/'s images, copies under other names (a longer run)
                client.put_many([(str(files[i % len(files)]), f"in/{i // len(files)}-{files[i % len(files)].name}")
                                 for i in range(n_inputs)])
            wait_until(lambda: len(cluster.ctl("vm_info")) >= workers, 120, 0.25, f"{workers} workers")
            jobs = {m: cluster.ctl("submit", model=m, inputs="in/", batch=2)["job_id"] for m in names}
            seen: dict[str, Any] = {"held": {}, "peak": {}, "budget": {}, "gaps": [], "gaps_long": [], "steady": [],
                                    "relative": {}, "all_first": None, "samples": [] if trace else None}
            t0 = time.monotonic()
            cluster.ctl("start")
            while time.monotonic() - t0 < timeout:
                sample(cluster, seen, time.monotonic() - t0)
                states = {j["job_id"]: j["state"] for j in cluster.ctl("jobs")}
                if all(states.get(j) in ("done", "failed", "cancelled") for j in jobs.values()):
                    break
                time.sleep(step)
            wall = time.monotonic() - t0
            sample(cluster, seen, wall)
            checks = {m: exactly_once(cluster, j, n_inputs) for m, j in jobs.items()}
            if trace:  # the samples and the coordinator's timeline (each result's worker, end, images)
                Path(f"{trace}-{name}.json").write_text(json.dumps(
                    {"samples": seen["samples"], "timeline": cluster.ctl("timeline", timeout=30.0)}))
            hwm = {p.name: (vm_hwm_kib(p.popen.pid) or 0) / 1024 for p in cluster.worker_procs()}
            return {"wall": wall, "checks": checks, "hwm": hwm, "loads": load_seconds(cluster), **seen}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--inputs", type=int, default=16,
                    help="images each job classifies (data/'s images, then copies of them under other names)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--budget-mb", type=int, default=0,
                    help="pools sized by model_memory_mb (pool_max_models 0) instead of pool_max_models = 2")
    ap.add_argument("--sample", type=float, default=2.0, help="seconds between vm_info / query_rate samples")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--trace", default="", metavar="PREFIX",
                    help="write every sample and the timeline to PREFIX-pools.json and PREFIX-baseline.json")
    ns = ap.parse_args()
    names = [m.strip() for m in ns.models.split(",") if m.strip()]
    n = max(1, ns.inputs)
    bound = ({"IDUNNO_MODEL_MEMORY_MB": str(ns.budget_mb), "IDUNNO_POOL_MAX_MODELS": "0"} if ns.budget_mb
             else {"IDUNNO_POOL_MAX_MODELS": "2"})
    label = f"pools (model_memory_mb = {ns.budget_mb})" if ns.budget_mb else "pools (pool_max_models = 2)"
    headline(f"model pools: {len(names)} jobs ({', '.join(names)}) x {n} inputs on {ns.workers} workers")
    res = {label: run("pools", bound, names, n, ns.workers, ns.sample, ns.timeout, ns.trace),
           "baseline (no pool bound)": run("baseline", {"IDUNNO_POOL_MAX_MODELS": "0"}, names, n, ns.workers,
                                           ns.sample, ns.timeout, ns.trace)}
    base = res["baseline (no pool bound)"]
    rows = []
    for what, r in res.items():
        gaps = r["gaps"] or [0.0]
        peak = max(r["peak"].values(), default=0)
        rows.append([what, f"{sum(ok for ok, _ in r['checks'].values())}/{len(names)}",
                     sum(d for _, d in r["checks"].values()), max(r["held"].values(), default=0),
                     peak, f"{max(r['hwm'].values(), default=0):.0f}", ratio(peak / max(1, max(base["peak"].values(),
                                                                                                default=1))),
                     f"{statistics.median(gaps) * 100:.1f}", f"{max(gaps) * 100:.1f}", len(r["gaps"]),
                     f"{statistics.median(r['steady'] or [0.0]) * 100:.1f} ({len(r['steady'])})",
                     f"{statistics.median(r['gaps_long'] or [0.0]) * 100:.1f}",
                     f"{r['wall']:.1f}", ratio(r["wall"] / base["wall"]), f"{sum(r['loads'].values()):.1f}"])
    table("pools against no pool bound (same run)",
          ["configuration", "jobs exactly once", "duplicates", "max models / worker", "peak RSS MB (hb)",
           "peak RSS MB (/proc)", "RSS vs baseline", "gap median %", "gap max %", "gap samples",
           "steady gap median % (samples)", "30 s gap median %", "wall s",
           "wall vs baseline", "load s (all)"], rows)
    table("seconds in model loads per job (summed over workers)", ["model", *res],
          [[m, *(f"{r['loads'].get(m, 0.0):.1f}" for r in res.values())] for m in names])
    table("steady state: each job's live rate against the mean of the running jobs' (median of the samples; "
          "1.00 = its fair share)", ["model", *res],
          [[m, *(f"{statistics.median(r['relative'][m]):.3f}" if r["relative"].get(m) else "-" for r in res.values())]
           for m in names])
    pooled = res[label]
    headline(f"{label}: max {max(pooled['held'].values(), default=0)} models per worker, peak RSS "
             f"{max(pooled['peak'].values(), default=0)} MB vs {max(base['peak'].values(), default=0)} MB unbounded; "
             f"gap median {statistics.median(pooled['gaps'] or [0.0]) * 100:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
