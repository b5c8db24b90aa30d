"""Membership benchmark: worker failure detection time, idle and under load, and heartbeat traffic.

Every part runs twice, once per detector: the adaptive phi-accrual detector (default config) and,
as the same-run baseline, the old fixed 1.5 s timeout (``IDUNNO_FAILURE_MAX_TIMEOUT=1.5``: the
ceiling equals the floor, heartbeat_interval x liveness).

* idle: a cluster without a standby (6 workers by default); a worker is SIGKILLed N times and the
  time from the kill to the coordinator marking it ``failed`` is measured (``members`` polled every
  20 ms; the coordinator's own ``fail`` event time is shown too), then a replacement worker is
  started and waits to join.
* under load (issue #11): 4 workers (torch_threads=1) kept busy by AlexNet jobs (batch 8, new jobs
  submitted before the last one runs dry) while ``cpu_hog(2)`` keeps 2 busy processes per core.
  For ``--observe`` seconds nothing is killed: every increase of the coordinator's
  ``failures_detected`` is a false detection. Then ``--load-kills`` workers are SIGKILLed one at a
  time (each replaced) and detection is timed as above; failures beyond the kills count as false.

Heartbeat traffic per node is computed from the encoded protocol messages.

    .venv/bin/python bench/membership.py [--quick] [--load] [--workers 6] [--kills 10]
                                         [--observe 60] [--load-kills 3]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from typing import Any

from benchlib import (
    DETECTORS,
    JobFeeder,
    alive_worker_procs,
    console,
    cpu_hog,
    detections,
    headline,
    info,
    kill_and_detect,
    put_copies,
    ratio,
    running,
    stats3,
    table,
    temp_dir,
    wait_joined,
    wait_models,
    wait_until,
)

from cli.cluster import LocalCluster
from common.protocol import Command, CoordinatorHeartbeat, Heartbeat, Topic
from common.rpc import RpcClient

ZMTP_SHORT_FRAME = 2  # ZMTP 3.x: flags byte + 1-byte size for frames < 256 bytes
TCP_IP_HEADERS = 52  # IPv4 (20) + TCP with timestamps (32) per segment; ZeroMQ sets TCP_NODELAY
LOAD_MODEL = "alexnet"
T0 = time.monotonic()


def log(msg: str) -> None:
    console.print(f"[{time.monotonic() - T0:6.1f}s] {msg}", highlight=False)


def kills_round(cluster: LocalCluster, rpc: RpcClient, kills: int, poll: float, rng: random.Random,
                interval: float, label: str, events_job: str | None = None) -> dict[str, Any]:
    """SIGKILL ``kills`` workers one after the other, each replaced; detection and join times."""
    rows, detect, detect_ev, joins = [], [], [], []
    killed: set[str] = set()
    node = ""
    for i in range(kills):
        ms = rpc.call(Command(0, "members", {}), timeout=5.0).data["members"]
        victim, node = rng.choice(alive_worker_procs(cluster, ms))
        time.sleep(rng.uniform(0, interval))  # random phase relative to the victim's heartbeat schedule
        found, ev_delay = kill_and_detect(cluster, rpc, victim, node, poll=poll, events_job=events_job)
        new = cluster.add_worker()
        join = wait_joined(cluster, new)
        detect.append(found)
        if ev_delay is not None:
            detect_ev.append(ev_delay)
        joins.append(join)
        rows.append([i + 1, node, found, ev_delay, join])
        killed.add(node)
        log(f"  {label}: kill {i + 1}/{kills}: {node} failed after {found:.3f}s; replacement joined in {join:.1f}s")
    return {"rows": rows, "detect": detect, "detect_ev": detect_ev, "joins": joins, "node": node, "killed": killed}


def run_idle(label: str, env: dict[str, str], workers: int, kills: int, poll: float, seed: int) -> dict[str, Any]:
    with temp_dir("idunno-bench-membership-") as tmp:
        cluster = LocalCluster(workers=workers, standby=False, data_dir=str(tmp), torch_threads=1, env=dict(env))
        t0 = time.perf_counter()
        with running(cluster, timeout=120):
            log(f"idle, {label}: {workers} workers ready in {time.perf_counter() - t0:.1f}s "
                f"(coordinator {cluster.coordinator}); {kills} kills")
            cfg = cluster.config()
            rpc = RpcClient(cfg.coordinators, cfg)
            wall0 = time.time()
            try:
                before = info(cluster)
                out = kills_round(cluster, rpc, kills, poll, random.Random(seed), cfg.heartbeat_interval,
                                  f"idle, {label}")
                after = info(cluster)
            finally:
                rpc.close()
            wrong = [r for r in detections(cluster, wall0, out["killed"]) if r[-1] == "FALSE"]
    out.update(cfg=cfg, wrong=wrong, false=after["failures_detected"] - before["failures_detected"] - kills,
               false_observe=None, stall=after["loop_stall_max"], gap=after["heartbeat_gap_max"])
    return out


def run_loaded(label: str, env: dict[str, str], workers: int, kills: int, observe: float, poll: float,
               copies: int, seed: int) -> dict[str, Any]:
    with temp_dir("idunno-bench-membership-load-") as tmp:
        cluster = LocalCluster(workers=workers, standby=False, data_dir=str(tmp), torch_threads=1,
                               env={**env, "IDUNNO_PRELOAD_MODELS": LOAD_MODEL})
        t0 = time.perf_counter()
        with running(cluster, timeout=180):
            wait_models(cluster, [LOAD_MODEL], workers, timeout=180)
            n_inputs, put_s = put_copies(cluster, copies)
            log(f"under load, {label}: {workers} workers with {LOAD_MODEL} ready in {time.perf_counter() - t0:.1f}s; "
                f"{n_inputs} inputs put in {put_s:.1f}s")
            cfg = cluster.config()
            rpc = RpcClient(cfg.coordinators, cfg)
            feeder = JobFeeder(cluster, [LOAD_MODEL], ["copies/"], batch=8)
            try:
                feeder.start()
                first = feeder.jobs[0][0]
                wait_until(lambda: cluster.ctl("completed", job=first, timeout=5.0)[first]["completed"] > 0,
                           120, 0.1, f"first result of {first}")
                with cpu_hog(2) as hog:
                    log(f"  {label}: jobs running, CPU hog of {len(hog)} processes on; observing {observe:.0f}s")
                    before = info(cluster)
                    wall0 = time.time()
                    done0 = sum(j["completed"] for j in cluster.ctl("jobs", timeout=5.0))
                    busy, samples = 0, 0
                    end = time.monotonic() + observe
                    while time.monotonic() < end:
                        vm = cluster.ctl("vm_info", timeout=5.0)
                        samples += 1
                        busy += sum(1 for w in vm.values() if w["tasks"]) / max(1, workers)
                        time.sleep(min(2.0, max(0.0, end - time.monotonic())))
                    mid = info(cluster)
                    done1 = sum(j["completed"] for j in cluster.ctl("jobs", timeout=5.0))
                    false_observe = mid["failures_detected"] - before["failures_detected"]
                    log(f"  {label}: {false_observe} false detection(s) in {observe:.0f}s; "
                        f"{(done1 - done0) / observe:.1f} img/s; workers busy {busy / max(1, samples):.0%}")
                    out = kills_round(cluster, rpc, kills, poll, random.Random(seed), cfg.heartbeat_interval,
                                      f"under load, {label}", events_job=first)
                    after = info(cluster)
            finally:
                feeder.stop()
                rpc.close()
            wrong = [r for r in detections(cluster, wall0, out["killed"]) if r[-1] == "FALSE"]
    out.update(cfg=cfg, wrong=wrong, false_observe=false_observe,
               false=after["failures_detected"] - before["failures_detected"] - kills,
               stall=after["loop_stall_max"], gap=after["heartbeat_gap_max"], rate=(done1 - done0) / observe,
               busy=busy / max(1, samples), jobs=len(feeder.jobs), feeder_errors=feeder.rpc_errors)
    return out


def div(a: float | None, b: float | None) -> float | str:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return "n/a"
    if b == 0:
        return "n/a (0/0)" if a == 0 else "inf"
    return a / b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 idle kills, 1 kill and 20 s under load")
    ap.add_argument("--load", action="store_true", help="only the under-load part")
    ap.add_argument("--workers", type=int, default=6, help="workers of the idle part")
    ap.add_argument("--kills", type=int, default=None, help="idle worker kills per detector (default 10, quick 3)")
    ap.add_argument("--load-workers", type=int, default=4)
    ap.add_argument("--observe", type=float, default=None,
                    help="seconds under load without kills, counting false detections (default 60, quick 20)")
    ap.add_argument("--load-kills", type=int, default=None, help="kills under load per detector (default 3, quick 1)")
    ap.add_argument("--copies", type=int, default=3, help="copies of the 100 test images per load job")
    ap.add_argument("--poll", type=float, default=0.02, help="members polling interval (s)")
    args = ap.parse_args()
    kills = args.kills or (3 if args.quick else 10)
    observe = args.observe or (20.0 if args.quick else 60.0)
    load_kills = args.load_kills or (1 if args.quick else 3)

    idle: dict[str, dict[str, Any]] = {}
    load: dict[str, dict[str, Any]] = {}
    if not args.load:
        for i, (label, env) in enumerate(DETECTORS):
            idle[label] = run_idle(label, env, args.workers, kills, args.poll, seed=1 + i)
    for i, (label, env) in enumerate(DETECTORS):
        load[label] = run_loaded(label, env, args.load_workers, load_kills, observe, args.poll, args.copies,
                                 seed=11 + i)

    any_run = next(iter((idle or load).values()))
    cfg = any_run["cfg"]
    interval, liveness, floor = cfg.heartbeat_interval, cfg.liveness, cfg.failure_timeout
    for part, runs in (("idle", idle), ("under load", load)):
        for label, r in runs.items():
            table(
                f"{part}, {label}: worker failure detection (SIGKILL -> state 'failed')",
                ["kill", "node", "detected (members poll, s)", "coordinator fail event (s)", "replacement join (s)"],
                r["rows"],
            )

    summary = []
    for part, runs in (("idle", idle), ("under load", load)):
        for label, r in runs.items():
            dmin, dmed, dmax = stats3(r["detect"])
            emed = statistics.median(r["detect_ev"]) if r["detect_ev"] else None
            summary.append([part, label, len(r["detect"]), r["false_observe"], r["false"], dmin, dmed, dmax, emed,
                            r["stall"], r["gap"]])
    table(
        f"failure detection per detector (members polled every {args.poll * 1000:.0f} ms; floor "
        f"{floor:.2f}s = {interval}s x {liveness}; adaptive ceiling {cfg.failure_max_timeout:.1f}s)",
        ["part", "detector", "kills", f"false det. ({observe:.0f} s, no kills)", "false det. (whole run)",
         "detect min (s)", "median (s)", "max (s)", "fail event median (s)", "loop stall max (s)",
         "heartbeat gap max (s)"],
        summary,
        caption="false detections: failures_detected minus the real kills (no other process was killed). "
                f"Under load: {args.load_workers} workers busy with AlexNet (batch 8, torch_threads=1) + cpu_hog(2).",
    )
    wrong = [[part, label, *w[:5]] for part, runs in (("idle", idle), ("under load", load))
             for label, r in runs.items() for w in r["wrong"]]
    if wrong:
        table("false detections: live members declared failed (coordinator logs)",
              ["part", "detector", "t (s)", "log", "node", "silent for (s)", "member age at failure (s)"], wrong,
              caption="t: since the start of the part's measurement; age: since this incarnation joined.")
    if load:
        rows = [[label, r["rate"], r["busy"] * 100, r["jobs"], r["feeder_errors"]] for label, r in load.items()]
        table("under load: the load during the observation window",
              ["detector", "AlexNet img/s", "workers with a task (% of samples)", "jobs submitted",
               "feeder RPC errors"], rows)

    names = [label for label, _ in DETECTORS]
    ratios = []
    for part, runs in (("idle", idle), ("under load", load)):
        if not runs:
            continue
        a, f = runs[names[0]], runs[names[1]]
        amed, fmed = stats3(a["detect"])[1], stats3(f["detect"])[1]
        fa = a["false_observe"] if a["false_observe"] is not None else a["false"]
        ff = f["false_observe"] if f["false_observe"] is not None else f["false"]
        ratios.append([part, amed, fmed, div(amed, fmed), fa, ff, div(float(fa), float(ff))])
    table(
        f"{names[0]} vs {names[1]} (same run)",
        ["part", f"detect median {names[0]} (s)", f"detect median {names[1]} (s)", "ratio",
         f"false det. {names[0]}", f"false det. {names[1]}", "ratio"],
        ratios,
        caption="false detections: the no-kill observation window under load; the whole run when idle.",
    )

    # Heartbeat traffic from the protocol's encoded sizes.
    node_example = any_run["node"]
    hb_idle = Heartbeat(node_example or "127.0.0.1:45678@1732780000000", 0, []).encode()
    hb_busy = Heartbeat(node_example or "127.0.0.1:45678@1732780000000", 2, ["alexnet", "resnet50"]).encode()
    chb = CoordinatorHeartbeat("127.0.0.1:45678", "primary", 1, 1234, 123456).encode()
    rate = 1.0 / interval
    worker_idle = len(hb_idle) + ZMTP_SHORT_FRAME
    worker_busy = len(hb_busy) + ZMTP_SHORT_FRAME
    coord = len(Topic.HEARTBEAT) + ZMTP_SHORT_FRAME + len(chb) + ZMTP_SHORT_FRAME
    subscribers = args.workers  # every worker subscribes (a standby would be one more)
    traffic = [
        ["worker -> coordinator Heartbeat (no model loaded)", len(hb_idle), worker_idle, rate, worker_idle * rate,
         (worker_idle + TCP_IP_HEADERS) * rate],
        ["worker -> coordinator Heartbeat (2 models loaded)", len(hb_busy), worker_busy, rate, worker_busy * rate,
         (worker_busy + TCP_IP_HEADERS) * rate],
        ["coordinator PUB hb -> each subscriber", len(chb), coord, rate, coord * rate,
         (coord + TCP_IP_HEADERS) * rate],
        [f"coordinator PUB hb, all {subscribers} subscribers", len(chb), coord, rate * subscribers,
         coord * rate * subscribers, (coord + TCP_IP_HEADERS) * rate * subscribers],
    ]
    table(
        "heartbeat traffic (computed from the encoded messages)",
        ["stream", "msgpack bytes", "ZMTP bytes/msg", "msgs/s", "bytes/s", "bytes/s incl. TCP/IP hdrs"],
        traffic,
        caption="ZMTP: 2-byte short-frame header per frame; DEALER->ROUTER identity is exchanged once at "
                "connect, not per message. TCP/IP: 52 B/segment, ACKs not counted.",
    )

    parts = []
    if idle:
        a, f = idle[names[0]], idle[names[1]]
        amed, fmed = stats3(a["detect"])[1], stats3(f["detect"])[1]
        parts.append(f"idle: detection median {amed:.2f}s {names[0]} vs {fmed:.2f}s {names[1]} = {ratio(amed / fmed)} "
                     f"(n={len(a['detect'])}+{len(f['detect'])}), false {a['false']} vs {f['false']}")
    if load:
        a, f = load[names[0]], load[names[1]]
        amed, fmed = stats3(a["detect"])[1], stats3(f["detect"])[1]
        parts.append(f"under load (AlexNet on {args.load_workers} workers + cpu_hog(2)): false detections in "
                     f"{observe:.0f}s "
                     f"{a['false_observe']} {names[0]} vs {f['false_observe']} {names[1]}; detection median "
                     f"{amed:.2f}s vs {fmed:.2f}s = {ratio(amed / fmed)} (max {stats3(a['detect'])[2]:.2f}s vs "
                     f"{stats3(f['detect'])[2]:.2f}s, n={len(a['detect'])}+{len(f['detect'])})")
    parts.append(f"heartbeat {worker_idle * rate:.0f} B/s per worker")
    headline("; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
