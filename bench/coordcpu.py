"""Where the cluster's CPU goes per query and per task (issue #14, "coordinator cost per query").

A local cluster of 2 torch-free workers (no standby) holds ``--inputs`` small files; for each batch
size in ``--batches`` (default 1, 2, 4, 8), ``--jobs`` noop jobs over all of them run back to back
(``completed`` polled every 20 ms, as a watching user would). Measured over the jobs: queries/s,
the coordinator's CPU (utime + stime from /proc) per query, split by thread (its loop thread,
ZeroMQ's I/O thread, the others: result writer, CURVE authenticator), and both workers' CPU per
query. Baseline (same run): batch 1, the issue's case. The last rows fit CPU per query = per task /
batch + per query (least squares over the batch sizes): what a task costs the coordinator beyond
its queries. ``py-spy record -p <coordinator pid>`` on the same loop shows the functions (see
bench/README.md).

    .venv/bin/python bench/coordcpu.py [--batches 1,2,4,8] [--jobs 6] [--inputs 1000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchlib import headline, ratio, running, table, temp_dir

from cli.cluster import LocalCluster
from sdfs.client import SdfsClient

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``, keyed ``tid:name`` (name: the kernel's comm)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[f"{tid}:{name}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run_jobs(cluster: LocalCluster, batch: int, jobs: int, n: int) -> dict[str, float]:
    coord = next(p for p in cluster.procs if p.role == "coordinator").popen.pid
    workers = [p.popen.pid for p in cluster.worker_procs()]
    before, wbefore = thread_cpu(coord), sum(process_cpu(w) for w in workers)
    elapsed = 0.0
    for _ in range(jobs):
        job = cluster.ctl("submit", model="noop", inputs="in/", batch=batch)["job_id"]
        t0 = time.monotonic()
        cluster.ctl("start")
        while cluster.ctl("completed", job=job)[job]["completed"] < n:
            time.sleep(0.02)  # the user's polling: part of what the coordinator serves
        elapsed += time.monotonic() - t0
    after, wafter = thread_cpu(coord), sum(process_cpu(w) for w in workers)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    queries = jobs * n
    main = delta.get(f"{coord}:python", 0.0)
    io = sum(v for k, v in delta.items() if "ZMQbg/IO" in k)
    return {"rate": queries / elapsed, "coord": 1e6 * sum(delta.values()) / queries, "loop": 1e6 * main / queries,
            "io": 1e6 * io / queries, "other": 1e6 * (sum(delta.values()) - main - io) / queries,
            "workers": 1e6 * (wafter - wbefore) / queries}


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(per task, per query) from cost per query = per_task / batch + per_query, least squares."""
    xs, ys = [1 / b for b, _ in points], [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return slope, my - slope * mx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--jobs", type=int, default=6, help="noop jobs per batch size")
    ap.add_argument("--inputs", type=int, default=1000)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    with temp_dir("idunno-bench-coordcpu-") as tmp:
        cluster = LocalCluster(workers=2, standby=False, data_dir=str(tmp / "c"), env={"IDUNNO_TORCH": "0"})
        with running(cluster, timeout=60):
            src = tmp / "files"
            src.mkdir()
            items = []
            for i in range(args.inputs):
                p = src / f"f{i}.bin"
                p.write_bytes(os.urandom(100))
                items.append((str(p), f"in/f{i}.bin"))
            with SdfsClient(cluster.config()) as client:
                client.put_many(items)
            results = {b: run_jobs(cluster, b, args.jobs, args.inputs) for b in batches}
    base = results[batches[0]]
    rows = [[b, f"{r['rate']:,.0f}", ratio(r["rate"] / base["rate"]), f"{r['coord']:.0f}", f"{r['loop']:.0f}",
             f"{r['io']:.0f}", f"{r['other']:.0f}", f"{r['workers']:.0f}"] for b, r in results.items()]
    if len(batches) >= 2:
        for what, key in (("coordinator", "coord"), ("both workers", "workers")):
            task, query = fit([(b, r[key]) for b, r in results.items()])
            rows.append([f"fit: {what}", "-", "-", f"{task:.0f} per task + {query:.0f} per query", "", "", "", ""])
    table(f"noop jobs of {args.inputs} queries, 2 torch-free workers, {args.jobs} jobs per batch size "
          f"(baseline: batch {batches[0]})",
          ["batch", "queries/s", "x baseline", "coordinator µs CPU/query", "its loop thread", "ZeroMQ I/O thread",
           "other threads", "both workers µs CPU/query"], rows)
    best = max(results, key=lambda b: results[b]["rate"])
    top = results[best]["rate"]
    headline(f"noop batch {batches[0]}: {base['rate']:,.0f} queries/s, coordinator {base['coord']:.0f} µs CPU per "
             f"query; batch {best}: {top:,.0f} queries/s ({top / base['rate']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
