"""Start-up benchmark: time to a ready cluster and to load the 100 test images into SDFS.

Times ``LocalCluster(workers=4, standby=True).start()`` until all 4 workers are alive members
(also shown: the coordinator's last worker ``join`` event), then ``put_many`` of the 100 images
in data/ with replication factor 4. Baseline (same run): the same 100 files copied locally with
shutil. Also compared with the targets (5 s ready, 2 s load) and the original course system's
published figures (28 s start, 20.6 s load).

    .venv/bin/python bench/startup.py [--quick] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

from benchlib import console, headline, images, table, temp_dir

from cli.cluster import LocalCluster
from sdfs.client import SdfsClient

TARGET_READY, TARGET_LOAD = 5.0, 2.0
STUDENT_READY, STUDENT_LOAD = 28.0, 20.6


def one_run(workers: int) -> dict[str, float]:
    files = images()
    with temp_dir("idunno-bench-startup-") as tmp:
        cluster = LocalCluster(workers=workers, standby=True, data_dir=str(tmp / "cluster"))
        try:
            wall0 = time.time()
            t0 = time.perf_counter()
            cluster.start(timeout=120)
            ready = time.perf_counter() - t0
            worker_names = {p.name for p in cluster.procs if p.role == "worker"}
            events = cluster.ctl("timeline", timeout=5.0)["events"]
            joins = [e["ts"] for e in events
                     if e["kind"] == "join" and e["detail"].rpartition("@")[0] in worker_names]
            last_join = max(joins) - wall0 if len(joins) >= workers else float("nan")
            local_dir = tmp / "local"
            local_dir.mkdir()
            t1 = time.perf_counter()
            for p in files:
                shutil.copyfile(p, local_dir / p.name)
            local = time.perf_counter() - t1
            t2 = time.perf_counter()
            with SdfsClient(cluster.config()) as client:
                client.put_many([(str(p), f"data/{p.name}") for p in files])
                load = time.perf_counter() - t2
                listed = len(client.ls("data/"))
        finally:
            cluster.stop()
    return {"ready": ready, "last_join": last_join, "load": load, "local": local, "files": len(files),
            "listed": listed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: one start")
    ap.add_argument("--repeat", type=int, default=None, help="cluster starts (default 3, quick 1)")
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)

    runs = []
    for i in range(repeat):
        r = one_run(args.workers)
        runs.append(r)
        console.print(f"  run {i + 1}/{repeat}: ready {r['ready']:.2f}s, load {r['files']} images {r['load']:.2f}s "
                      f"(local copy {r['local'] * 1000:.1f} ms)")
        if r["listed"] != r["files"]:
            raise RuntimeError(f"SDFS lists {r['listed']} files after put_many of {r['files']}")

    table(
        f"start-up: coordinator + standby + {args.workers} workers, then load {runs[0]['files']} images (RF 4)",
        ["run", "start() -> all workers alive (s)", "last worker join event (s)", "put_many 100 images (s)",
         "local shutil copy (s)", "put_many / local copy"],
        [[i + 1, r["ready"], r["last_join"], r["load"], r["local"], r["load"] / r["local"]]
         for i, r in enumerate(runs)],
    )
    ready = statistics.median(r["ready"] for r in runs)
    load = statistics.median(r["load"] for r in runs)
    local = statistics.median(r["local"] for r in runs)
    table(
        f"median of {repeat} runs against targets and the original system",
        ["metric", "measured (s)", "target (s)", "x target", "original system (s)", "x original",
         "x local copy (same run)"],
        [
            ["cluster ready", ready, TARGET_READY, ready / TARGET_READY, STUDENT_READY, ready / STUDENT_READY, None],
            ["load 100 images", load, TARGET_LOAD, load / TARGET_LOAD, STUDENT_LOAD, load / STUDENT_LOAD,
             load / local],
        ],
    )
    headline(f"cluster ready in {ready:.2f}s = {ready / TARGET_READY:.2f}x of the 5 s target "
             f"({ready / STUDENT_READY:.2f}x of the original 28 s); 100 images loaded in {load:.2f}s = "
             f"{load / local:.0f}x a local copy ({local * 1000:.0f} ms), {load / TARGET_LOAD:.2f}x of the 2 s target "
             f"({load / STUDENT_LOAD:.3f}x of the original 20.6 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
