"""Membership benchmark: worker failure detection time and heartbeat traffic.

Starts a cluster without a standby (6 workers by default), SIGKILLs a worker N times and measures
the time from the kill to the coordinator marking it ``failed`` (``members`` polled every 20 ms;
the coordinator's own ``fail`` event time is shown too), then starts a replacement worker and
waits for it to join. Heartbeat traffic per node is computed from the encoded protocol messages.

Baseline: the configured failure timeout (heartbeat_interval x liveness).

    .venv/bin/python bench/membership.py [--quick] [--workers 6] [--kills 10]
"""

from __future__ import annotations

import argparse
import random
import time

from benchlib import console, headline, running, stats3, table, temp_dir, wait_until

from cli.cluster import LocalCluster
from common.protocol import Command, CoordinatorHeartbeat, Heartbeat, Topic
from common.rpc import RpcClient, RpcError

ZMTP_SHORT_FRAME = 2  # ZMTP 3.x: flags byte + 1-byte size for frames < 256 bytes
TCP_IP_HEADERS = 52  # IPv4 (20) + TCP with timestamps (32) per segment; ZeroMQ sets TCP_NODELAY


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 kills")
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--kills", type=int, default=None, help="worker kills (default 10, quick 3)")
    ap.add_argument("--poll", type=float, default=0.02, help="members polling interval (s)")
    args = ap.parse_args()
    kills = args.kills or (3 if args.quick else 10)
    rng = random.Random(1)

    with temp_dir("idunno-bench-membership-") as tmp:
        cluster = LocalCluster(workers=args.workers, standby=False, data_dir=str(tmp), torch_threads=1)
        t0 = time.perf_counter()
        with running(cluster, timeout=120):
            console.print(f"cluster with {args.workers} workers ready in {time.perf_counter() - t0:.1f}s "
                          f"(coordinator {cluster.coordinator}); {kills} kills")
            cfg = cluster.config()
            interval, liveness, timeout = cfg.heartbeat_interval, cfg.liveness, cfg.failure_timeout
            rpc = RpcClient(cfg.coordinators, cfg)

            def members() -> list[dict]:
                return rpc.call(Command(0, "members", {}), timeout=1.0).data["members"]

            rows, detect, detect_ev, joins = [], [], [], []
            node_example = ""
            try:
                for i in range(kills):
                    alive = {m["data_addr"]: m for m in members() if m["state"] == "alive" and m["role"] == "worker"}
                    victim = next(p for p in cluster.worker_procs() if p.addr in alive)
                    node = alive[victim.addr]["node_id"]
                    node_example = node
                    # Random phase relative to the victim's heartbeat schedule.
                    time.sleep(rng.uniform(0, interval))
                    kill_wall = time.time()
                    k0 = time.perf_counter()
                    cluster.kill(victim)
                    found = None
                    while time.perf_counter() - k0 < 30:
                        try:
                            m = next((m for m in members() if m["node_id"] == node), None)
                        except RpcError:
                            m = None
                        if m is not None and m["state"] == "failed":
                            found = time.perf_counter() - k0
                            break
                        time.sleep(args.poll)
                    if found is None:
                        raise RuntimeError(f"{node} was not declared failed within 30s")
                    events = cluster.ctl("timeline", timeout=5.0)["events"]
                    ev = next((e for e in events if e["kind"] == "fail" and e["detail"] == node), None)
                    ev_delay = ev["ts"] - kill_wall if ev else None
                    # Replacement worker.
                    j0 = time.perf_counter()
                    new = cluster.add_worker()
                    wait_until(
                        lambda new=new: any(m["data_addr"] == new.addr and m["state"] == "alive" for m in members()),
                        60, 0.05, f"replacement worker {new.addr} to join",
                    )
                    join = time.perf_counter() - j0
                    detect.append(found)
                    if ev_delay is not None:
                        detect_ev.append(ev_delay)
                    joins.append(join)
                    rows.append([i + 1, node, found, ev_delay, found / timeout, join])
                    console.print(f"  kill {i + 1}/{kills}: {node} failed after {found:.3f}s; "
                                  f"replacement joined in {join:.2f}s")
            finally:
                rpc.close()

    table(
        "worker failure detection (SIGKILL -> state 'failed')",
        ["kill", "node", "detected (members poll, s)", "coordinator fail event (s)", "x failure timeout",
         "replacement join (s)"],
        rows,
    )
    dmin, dmed, dmax = stats3(detect)
    emin, emed, emax = stats3(detect_ev)
    jmin, jmed, jmax = stats3(joins)
    table(
        f"summary over {len(detect)} kills (failure timeout {timeout:.2f}s = {interval}s x {liveness})",
        ["metric", "min", "median", "max"],
        [
            ["detection, members poll every %.0f ms (s)" % (args.poll * 1000), dmin, dmed, dmax],
            ["detection, coordinator's fail event (s)", emin, emed, emax],
            ["detection / failure timeout", dmin / timeout, dmed / timeout, dmax / timeout],
            ["replacement worker spawn -> alive (s)", jmin, jmed, jmax],
        ],
    )

    # Heartbeat traffic from the protocol's encoded sizes.
    hb_idle = Heartbeat(node_example or "127.0.0.1:45678@1732780000000", 0, []).encode()
    hb_busy = Heartbeat(node_example or "127.0.0.1:45678@1732780000000", 2, ["alexnet", "resnet50"]).encode()
    chb = CoordinatorHeartbeat(cluster.coordinator, "primary", 1, 1234, 1234, 123456).encode()
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
    headline(f"worker failure detection median {dmed:.2f}s (min {dmin:.2f}, max {dmax:.2f}, n={len(detect)}) = "
             f"{dmed / timeout:.2f}x of the failure timeout ({timeout:.2f}s); heartbeat "
             f"{worker_idle * rate:.0f} B/s per worker")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
