"""SDFS benchmark: put/get throughput against a local copy, and the nodes' peak memory.

Cluster with 4 workers (replication factor 4, i.e. every put writes 4 replicas). For each file
size: a local ``shutil.copyfile`` (the baseline, same run, same disk), an SDFS ``put`` and an SDFS
``get`` to a local file (checksum-verified by the client). Small sizes are repeated and the median
is reported. After each size the peak RSS (``VmHWM``) of every cluster process is read from
``/proc``: it must stay bounded (streaming in chunks), not grow with the file size.

    .venv/bin/python bench/sdfs.py [--quick] [--sizes 1,64,256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

from benchlib import console, headline, ratio, running, table, temp_dir, vm_hwm_kib, wait_memory_settled

from cli.cluster import LocalCluster
from sdfs.client import SdfsClient

MiB = 1024 * 1024


def make_file(path: Path, size: int) -> None:
    block = 4 * MiB
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            n = min(block, left)
            fh.write(os.urandom(n))
            left -= n


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 and 16 MiB")
    ap.add_argument("--sizes", help="comma list of sizes in MiB (default 1,64,256; quick 1,16)")
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or ("1,16" if args.quick else "1,64,256")).split(",")]

    rows, mem_cols, results = [], [], {}
    with temp_dir("idunno-bench-sdfs-") as tmp:
        cluster = LocalCluster(workers=args.workers, standby=True, data_dir=str(tmp / "cluster"), torch_threads=1)
        with running(cluster, timeout=120):
            cfg = cluster.config()
            console.print(f"cluster with {args.workers} workers + standby ready; replication factor "
                          f"{cfg.replication_factor}, chunk {cfg.chunk_bytes // 1024} KiB, "
                          f"window {cfg.transfer_window} chunks")
            procs = [p for p in cluster.procs if p.popen.poll() is None]
            settled = wait_memory_settled([p.popen.pid for p in procs])
            console.print(f"  (waited {settled:.1f}s for the nodes' memory to settle after start-up)")
            hwm_before = {p.popen.pid: vm_hwm_kib(p.popen.pid) for p in procs}
            with SdfsClient(cfg) as client:
                for size_mib in sizes:
                    size = size_mib * MiB
                    src, cp_dst, get_dst = tmp / f"src-{size_mib}.bin", tmp / f"cp-{size_mib}.bin", tmp / "get.bin"
                    make_file(src, size)
                    repeat = max(3, min(5, 64 // size_mib))
                    name = f"bench/file-{size_mib}MiB"
                    t_cp, t_put, t_get = [], [], []
                    for _ in range(repeat):
                        t_cp.append(timed(lambda src=src, cp_dst=cp_dst: shutil.copyfile(src, cp_dst)))
                        cp_dst.unlink()
                        t_put.append(timed(lambda src=src, name=name: client.put(src, name)))
                        t_get.append(timed(lambda name=name, dst=get_dst: client.get(name, dst)))
                        if get_dst.stat().st_size != size:
                            raise RuntimeError(f"get returned {get_dst.stat().st_size} bytes, expected {size}")
                        get_dst.unlink()
                    src.unlink()
                    cp, put, get = (statistics.median(t) for t in (t_cp, t_put, t_get))
                    results[size_mib] = (cp, put, get)
                    rows.append([f"{size_mib} MiB", repeat, size_mib / cp, size_mib / put, size_mib / get,
                                 cp / put, cp / get, put, get])
                    mem_cols.append({p.popen.pid: vm_hwm_kib(p.popen.pid) for p in procs})
                    console.print(f"  {size_mib} MiB: cp {size_mib / cp:.0f} MiB/s, put {size_mib / put:.1f} MiB/s, "
                                  f"get {size_mib / get:.1f} MiB/s")

    table(
        f"SDFS throughput, replication factor {cfg.replication_factor} (median of 'n' runs; MiB/s of file data)",
        ["size", "n", "local cp MiB/s", "put MiB/s", "get MiB/s", "put / cp", "get / cp", "put s", "get s"],
        rows,
    )
    mem_rows = []
    for p in procs:
        pid = p.popen.pid
        before = hwm_before.get(pid)
        mem_rows.append([f"{p.role} {p.addr}", before / 1024 if before else None,
                         *[(c.get(pid) or 0) / 1024 for c in mem_cols]])
    own = vm_hwm_kib(os.getpid())
    mem_rows.append(["bench client (this process)", None, *([None] * (len(sizes) - 1)), own / 1024 if own else None])
    table(
        "peak RSS (VmHWM, MiB) of every cluster process, before the first put and after each size",
        ["process", "before", *[f"after {s} MiB" for s in sizes]],
        mem_rows,
        caption="VmHWM is a high-water mark over the process's life: a column-to-column increase means "
                "that size needed more memory.",
    )
    growth = max(((c.get(p.popen.pid) or 0) - (hwm_before.get(p.popen.pid) or 0)) / 1024
                 for p in procs for c in mem_cols)
    big = sizes[-1]
    cp, put, get = results[big]
    headline(f"sdfs {big} MiB put = {ratio(cp / put)} local cp throughput ({big / put:.0f} vs {big / cp:.0f} MiB/s, "
             f"RF {cfg.replication_factor}), get = {ratio(cp / get)} ({big / get:.0f} MiB/s); "
             f"max node peak-RSS growth {growth:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
