"""SDFS master at scale: what one repair tick and the node events cost the coordinator loop.

A master (in process, no network) holds ``--files`` files (default 100,000, the issue's large-state
size) on 6 storage nodes with RF 4. Measured, in milliseconds of coordinator-loop time:

* an idle repair tick (nothing changed), against the same-run baseline of one full scan of the
  namespace (what every tick cost when ``repair()`` walked every file each second);
* ``node_down`` of a node holding two thirds of the files, and the repair ticks that follow (each
  examines at most MAX_CHECKS_PER_TICK versions and issues at most MAX_REPAIRS_IN_FLIGHT copies);
* a rejoin: ``node_report`` of a restarted node listing its whole store (new incarnation).

    .venv/bin/python bench/sdfs_master.py [--files 100000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchlib import headline, ratio, table

from common.config import Config
from sdfs.master import SdfsMaster

NOW = 1000.0


def build(files: int) -> tuple[SdfsMaster, dict[str, str]]:
    live = {f"n{i}@1": f"10.0.0.{i}:9000" for i in range(6)}
    master = SdfsMaster(Config(replication_factor=4), lambda: live)
    batch = 1000
    for start in range(0, files, batch):
        plans = master.begin_put([{"name": f"data/f{i:07d}", "size": 1000, "checksum": "c"}
                                  for i in range(start, min(files, start + batch))], NOW)
        master.commit_put([{"put_id": p["put_id"], "stored": [r["node_id"] for r in p["replicas"]]}
                           for p in plans], NOW)
    while master.dirty:  # the first ticks check every freshly committed version once
        master.repair(NOW)
    return master, live


def ms(fn, rounds: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    t0 = time.perf_counter()
    master, live = build(args.files)
    build_s = time.perf_counter() - t0

    idle = ms(lambda: master.repair(NOW), args.rounds)
    scan = ms(master.under_replicated, args.rounds)  # baseline: one walk of every version

    victim = max(master.held, key=lambda n: len(master.held[n]))
    held = len(master.held[victim])
    node_id = f"{victim}@1"
    store = [[n, v, master.files[n][v].size, master.files[n][v].checksum] for n, v in master.held[victim]]
    del live[node_id]
    t1 = time.perf_counter()
    master.node_down(node_id)
    down_ms = (time.perf_counter() - t1) * 1000
    ticks = []
    copies = 0
    while master.dirty and len(ticks) < 1000:
        t2 = time.perf_counter()
        out = master.repair(NOW)
        ticks.append((time.perf_counter() - t2) * 1000)
        copies += len(out)
        for target, m in out:  # every copy succeeds at once
            master.stored(target, m.name, m.version, True, m.checksum)
    other = next(n for n in master.held if n != victim)
    other_store = [[n, v, master.files[n][v].size, master.files[n][v].checksum] for n, v in master.held[other]]
    t4 = time.perf_counter()
    master.node_report(f"{other}@1", other_store)  # unchanged: what every worker sends a new primary
    reattach_ms = (time.perf_counter() - t4) * 1000
    back = f"{victim}@2"
    live[back] = "10.0.0.99:9000"
    t3 = time.perf_counter()
    master.node_report(back, store)
    report_ms = (time.perf_counter() - t3) * 1000

    med_idle, med_scan = statistics.median(idle), statistics.median(scan)
    table(f"SDFS master with {args.files:,} files on 6 nodes, RF 4 (built in {build_s:.1f} s)",
          ["operation", "median ms", "max ms", "note"],
          [["full namespace scan (baseline: the old per-tick repair)", med_scan, max(scan), "every second"],
           ["repair tick, nothing changed", med_idle, max(idle), f"{ratio(med_idle / med_scan)} of baseline"],
           [f"node_down of a node holding {held:,} versions", down_ms, down_ms, "marks them for repair"],
           ["repair tick while re-replicating", statistics.median(ticks), max(ticks),
            f"{len(ticks)} ticks, {copies:,} copies"],
           [f"node_report of {len(other_store):,} replicas, re-attach", reattach_ms, reattach_ms,
            "same incarnation (failover)"],
           [f"node_report of its {held:,} replicas (rejoin)", report_ms, report_ms, "new incarnation"]])
    headline(f"SDFS repair tick at {args.files:,} files: {med_idle:.3f} ms idle vs {med_scan:.1f} ms for a full "
             f"scan ({ratio(med_idle / med_scan)}); {statistics.median(ticks):.1f} ms median while repairing")


if __name__ == "__main__":
    main()
