"""Scale benchmark: 100 torch-free worker processes and 10 noop jobs, against 10 workers in the same run.

Workers run with ``IDUNNO_TORCH=0`` (they never import torch: 28 MiB RSS each), so a
hundred of them and their pulse sidecars fit on one machine. The ``noop`` model computes nothing,
so what is measured is the cluster's own cost. No standby (the coordinator alone is measured).
For each cluster size:

* idle CPU: the coordinator's and all workers' CPU over ``--idle`` (5) seconds with no job
  (heartbeats, pulses, loop polls), in % of one core;
* dispatch rate: queries answered per second of the run (10 noop jobs over the same inputs, all
  submitted, then started together; from ``start`` until every job is done);
* coordinator CPU %: utime + stime of the coordinator process over that run (/proc/<pid>/stat),
  in % of one core;
* fairness: ``query_rate``'s gap among the running jobs ((max - min) / max of the 10 s window
  rates), sampled every second from 3 s after start until the first job ends (median and worst);
* heartbeat bytes/s into the coordinator: every worker's ``Heartbeat`` and its sidecar's ``Pulse``
  per heartbeat interval, from the protocol's encoded sizes (+ ZMTP framing, as bench/membership.py),
  plus the coordinator's PUB heartbeat to every subscriber;
* failure detection: ``--kills`` workers SIGKILLed one at a time, each timed until ``members``
  shows it failed (polled every 20 ms).

    .venv/bin/python bench/scale.py [--quick] [--workers 100] [--baseline 10] [--inputs 600]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchlib import (
    alive_worker_procs,
    console,
    headline,
    kill_and_detect,
    ratio,
    running,
    stats3,
    table,
    temp_dir,
    vm_rss_kib,
)

from cli.cluster import LocalCluster
from common.config import Config
from common.protocol import CoordinatorHeartbeat, Heartbeat, Pulse, Topic
from common.rpc import RpcClient
from sdfs.client import SdfsClient

ZMTP_SHORT_FRAME = 2  # ZMTP 3.x: flags byte + 1-byte size for frames < 256 bytes
JOBS = 10
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat, after the command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def heartbeat_bytes_per_s(workers: int, node: str, interval: float) -> float:
    hb = len(Heartbeat(node, 2, ["noop"]).encode()) + ZMTP_SHORT_FRAME
    pulse = len(Pulse(node).encode()) + ZMTP_SHORT_FRAME
    chb = CoordinatorHeartbeat("127.0.0.1:45678", "primary", 1, 1234, 123456).encode()
    pub = len(Topic.HEARTBEAT) + ZMTP_SHORT_FRAME + len(chb) + ZMTP_SHORT_FRAME
    return workers * (hb + pulse + pub) / interval


def measure(n_workers: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    console.print(f"[bold]{n_workers} workers[/]: starting (torch-free)...")
    cluster = LocalCluster(workers=n_workers, standby=False, data_dir=str(scratch / f"c{n_workers}"),
                           torch_threads=1, env={"IDUNNO_TORCH": "0"})
    t_boot = time.perf_counter()
    with running(cluster, timeout=args.start_timeout):
        boot = time.perf_counter() - t_boot
        console.print(f"  {n_workers} workers alive after {boot:.0f} s")
        inputs = scratch / "inputs"
        inputs.mkdir(exist_ok=True)
        items = []
        for i in range(args.inputs):
            p = inputs / f"x{i:05d}.bin"
            p.write_bytes(b"noop input %d" % i)  # noop takes any bytes
            items.append((str(p), f"in/x{i:05d}.bin"))
        with SdfsClient(cluster.config()) as client:
            client.put_many(items)
        coord = next(p for p in cluster.procs if p.role == "coordinator")
        jobs = [cluster.ctl("submit", model="noop", inputs="in/", batch=args.batch)["job_id"] for _ in range(JOBS)]
        workers = [p.popen.pid for p in cluster.worker_procs()]
        rss = statistics.median(vm_rss_kib(pid) or 0 for pid in workers) / 1024
        # Idle cost first: what the members cost while nothing runs (heartbeats, pulses, loop polls).
        idle0 = time.perf_counter()
        icpu0 = cpu_seconds(coord.popen.pid), sum(cpu_seconds(pid) for pid in workers)
        time.sleep(args.idle)
        idle_wall = time.perf_counter() - idle0
        idle_coord = 100.0 * (cpu_seconds(coord.popen.pid) - icpu0[0]) / idle_wall
        idle_workers = 100.0 * (sum(cpu_seconds(pid) for pid in workers) - icpu0[1]) / idle_wall
        cpu0 = cpu_seconds(coord.popen.pid)
        wcpu0 = sum(cpu_seconds(pid) for pid in workers)
        t0 = time.perf_counter()
        cluster.ctl("start")
        gaps: list[float] = []
        next_sample = t0 + 3.0
        while True:
            time.sleep(0.1)  # polling another process's state; there is no event to wait on
            rates = cluster.ctl("query_rate", timeout=10.0)
            states = [rates["jobs"][j]["state"] for j in jobs]
            now = time.perf_counter()
            if all(s == "done" for s in states):
                break
            if now >= next_sample and all(s == "running" for s in states):
                next_sample += 1.0  # the fairness figure a user sees, once a second
                gaps.append(rates["gap"])
            if now - t0 > args.run_timeout:
                raise TimeoutError(f"jobs not done within {args.run_timeout:.0f}s")
        wall = now - t0  # to within the 0.1 s polling
        cpu = cpu_seconds(coord.popen.pid) - cpu0
        wcpu = sum(cpu_seconds(pid) for pid in workers) - wcpu0
        total = sum(rates["jobs"][j]["count"] for j in jobs)
        finished = [j["overall"] for j in rates["jobs"].values()]
        members = cluster.members(timeout=10.0)
        rpc = RpcClient(cluster.config().coordinators, cluster.config())
        detect = []
        try:
            for _ in range(args.kills):
                proc, node = alive_worker_procs(cluster, cluster.members(timeout=10.0))[-1]
                seen, _ = kill_and_detect(cluster, rpc, proc, node)
                detect.append(seen)
                console.print(f"  killed {node}: failed in members after {seen:.2f} s")
        finally:
            rpc.close()
        node = next(m["node_id"] for m in members if m["role"] == "worker")
    cfg = Config()
    return {
        "workers": n_workers, "boot": boot, "queries": total, "wall": wall, "rate": total / wall,
        "cpu_pct": 100.0 * cpu / wall, "workers_cpu_pct": 100.0 * wcpu / wall, "rss": rss,
        "idle_coord": idle_coord, "idle_workers": idle_workers,
        "cpu_per_query_us": 1e6 * cpu / max(1, total),
        "gap_median": statistics.median(gaps) if gaps else float("nan"),
        "gap_max": max(gaps) if gaps else float("nan"), "gap_samples": len(gaps),
        "hb_bytes": heartbeat_bytes_per_s(n_workers, node, cfg.heartbeat_interval),
        "detect": detect, "overall_rates": finished,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 workers instead of 100")
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--baseline", type=int, default=10)
    ap.add_argument("--inputs", type=int, default=2000, help="inputs per job (every job reads the same ones)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured before the jobs")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--run-timeout", type=float, default=600.0)
    args = ap.parse_args()
    if args.quick:
        args.workers = min(args.workers, 30)
    load = os.getloadavg()
    console.print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    with temp_dir("idunno-scale-") as scratch:
        base = measure(args.baseline, args, scratch)
        big = measure(args.workers, args, scratch)
    b, n = args.baseline, args.workers
    rows = []

    def row(name: str, key: str) -> None:
        x, y = base[key], big[key]
        rows.append([name, x, y, ratio(y / x) if x else "-"])

    row("workers alive after (s)", "boot")
    row("queries", "queries")
    row("dispatch rate (queries/s)", "rate")
    row("coordinator CPU (% of one core)", "cpu_pct")
    row("coordinator CPU per query (µs)", "cpu_per_query_us")
    row("all workers' CPU (% of one core)", "workers_cpu_pct")
    row("worker RSS, median (MiB)", "rss")
    row("idle: coordinator CPU (%)", "idle_coord")
    row("idle: all workers' CPU (%)", "idle_workers")
    row("query_rate gap among 10 jobs, median", "gap_median")
    row("query_rate gap among 10 jobs, worst", "gap_max")
    row("heartbeat bytes/s into + out of the coordinator", "hb_bytes")
    for r in (base, big):
        r["detect_median"] = stats3(r["detect"])[1]
        r["detect_max"] = stats3(r["detect"])[2]
    row(f"failure detection, median of {args.kills} (s)", "detect_median")
    row(f"failure detection, worst of {args.kills} (s)", "detect_max")
    table(f"Scale: {n} torch-free workers vs {b} (10 noop jobs, batch {args.batch}, {args.inputs} inputs each)",
          ["", f"{b} workers", f"{n} workers", "ratio"], rows,
          caption=f"gap samples: {base['gap_samples']} / {big['gap_samples']}; load average at start "
                  f"{load[0]:.2f} on {os.cpu_count()} cores")
    headline(f"{n} workers: {big['rate']:,.0f} queries/s ({ratio(big['rate'] / base['rate'])} of {b} workers), "
             f"coordinator {big['cpu_pct']:.0f}% CPU, fairness gap median {big['gap_median']:.1%}, "
             f"failure detection {big['detect_median']:.2f} s, heartbeats {big['hb_bytes'] / 1024:.1f} KiB/s")


if __name__ == "__main__":
    main()
