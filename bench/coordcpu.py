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

``--credits 2,8`` runs the whole table once per ``worker_credit`` (each on a cluster of its own, the
first the baseline): how the pipelining depth spreads the per-task cost over Bundles.

    .venv/bin/python bench/coordcpu.py [--batches 1,2,4,8] [--jobs 6] [--inputs 1000] [--credits 8]
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


def measure(batches: list[int], jobs: int, inputs: int, credit: int) -> dict[int, dict[str, float]]:
    """Each batch size's figures on a fresh cluster (``credit`` 0: the config's worker_credit)."""
    env = {"IDUNNO_TORCH": "0"} | ({"IDUNNO_WORKER_CREDIT": str(credit)} if credit else {})
    with temp_dir("idunno-bench-coordcpu-") as tmp:
        cluster = LocalCluster(workers=2, standby=False, data_dir=str(tmp / "c"), env=env)
        with running(cluster, timeout=60):
            src = tmp / "files"
            src.mkdir()
            items = []
            for i in range(inputs):
                p = src / f"f{i}.bin"
                p.write_bytes(os.urandom(100))
                items.append((str(p), f"in/f{i}.bin"))
            with SdfsClient(cluster.config()) as client:
                client.put_many(items)
            return {b: run_jobs(cluster, b, jobs, inputs) for b in batches}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--jobs", type=int, default=6, help="noop jobs per batch size")
    ap.add_argument("--inputs", type=int, default=1000)
    ap.add_argument("--credits", default="", help="comma list of worker_credit values (default: the config's)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    credits = [int(c) for c in args.credits.split(",") if c.strip()] or [0]
    runs = {credit: measure(batches, args.jobs, args.inputs, credit) for credit in credits}
    base = runs[credits[0]][batches[0]]
    rows = []
    for credit, results in runs.items():
        label = f"credit {credit}, batch " if credit else ""
        rows += [[f"{label}{b}", f"{r['rate']:,.0f}", ratio(r["rate"] / base["rate"]), f"{r['coord']:.0f}",
                  f"{r['loop']:.0f}", f"{r['io']:.0f}", f"{r['other']:.0f}", f"{r['workers']:.0f}"]
                 for b, r in results.items()]
        if len(batches) >= 2:
            for what, key in (("coordinator", "coord"), ("both workers", "workers")):
                task, query = fit([(b, r[key]) for b, r in results.items()])
                rows.append([f"fit{f' (credit {credit})' if credit else ''}: {what}", "-", "-",
                             f"{task:.0f} per task + {query:.0f} per query", "", "", "", ""])
    first = f"credit {credits[0]}, batch {batches[0]}" if credits[0] else f"batch {batches[0]}"
    table(f"noop jobs of {args.inputs} queries, 2 torch-free workers, {args.jobs} jobs per batch size "
          f"(baseline: {first})",
          ["batch", "queries/s", "x baseline", "coordinator µs CPU/query", "its loop thread", "ZeroMQ I/O thread",
           "other threads", "both workers µs CPU/query"], rows)
    parts = []
    for credit, results in runs.items():
        r = results[batches[0]]
        parts.append(f"{'credit ' + str(credit) + ' ' if credit else ''}batch {batches[0]}: {r['rate']:,.0f} queries/s "
                     f"({r['rate'] / base['rate']:.2f}x), coordinator {r['coord']:.0f} µs CPU per query")
    headline("noop " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
