"""Throughput benchmark: (a) cluster images/s against plain PyTorch, (b) dispatch rate, (c) control RPC.

(a) Two workers with one torch thread each (2 threads in total) run one AlexNet job over N images
    (the 100 test images repeated) with batch 8, measured from the first dispatch to the last
    result (``timeline`` spans), after an untimed warm-up job. Baseline (same run): one process with
    ``torch.set_num_threads(2)`` that reads, decodes (``models.decode_image``) and classifies
    (``get_classifier("alexnet").predict_batch``) the same images in batches of 8, after one untimed
    warm-up batch. Native and cluster runs alternate (3 rounds, medians reported) while the cluster
    is up but idle. Goal: cluster >= 0.95x native.

(b) Broker dispatch rate: a job of the ``noop`` model (no torch, inputs not even decoded) with
    batch 1 over the same inputs on the same 2 workers, queries/s from the first dispatch to the
    last result: the whole per-query path (scheduler, Task, input read, executor threads,
    TaskResult, ResultAck, statistics, replication journal). Baseline (same run): raw ZeroMQ
    ROUTER -> DEALER round trips of the same shape: one ROUTER (this process) feeding 2 DEALER
    processes with 2 messages in flight each (the workers' credit), msgpack frames of the sizes of
    an encoded Task and TaskResult. Goal: >= 0.5x.

(c) Request/reply overhead of the control path: ``Command(name="members")`` round trips through
    ``common.rpc.RpcClient`` against the primary, against a bare pyzmq DEALER->ROUTER echo (msgpack
    decode + encode of a reply of the same size, server in its own process).

(d) CLI round trip: wall time of a whole ``idunno ctl jobs`` process (interpreter start, imports,
    finding the cluster, one request, output), ``--json`` and the table form, against
    ``python -c pass`` in the same run (the three alternate, N times each, after one untimed run of
    each so the bytecode cache is warm as on a user's machine). Goal: at most 0.15 s over the baseline.

(e) The cost of encryption: the same measurements against a cluster started with ``--insecure``
    (plaintext, no ZAP) and one with the default CURVE keys, alternating rounds (both 2 workers, no
    standby): the (b) noop dispatch rate, (c) 'members' RPC round trips and an SDFS put of a 32 MB
    file (RF 4, so 128 MB encrypted in and out). Baseline (same run): the --insecure cluster.

(f) Both jobs (issue #14): an AlexNet job and a ResNet-50 job over the same ``--both-images`` (100)
    images, batch 8 each, submitted together on the (a) cluster (both models preloaded), from the
    first dispatch of either to the last result of both. Fair-time serves the two at equal image
    rates, so the ceiling for each is 1/(1/A + 1/R) images/s, A and R the plain-loop rates of (a)'s
    native process for AlexNet and ResNet-50 measured in the same rounds (ResNet-50 as in (a): 2
    threads, read + decode + predict in batches of 8). Goal: cluster >= 0.95x the ceiling.

    .venv/bin/python bench/throughput.py [--quick] [--images 300] [--round-trips 10000] [--cli-only]
                                         [--curve-only] [--jobs-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import msgpack
import zmq
from benchlib import (
    ROOT,
    cluster_cpu_seconds,
    console,
    headline,
    images,
    put_copies,
    running,
    table,
    temp_dir,
    wait_models,
    wait_until,
)

from cli.cluster import LocalCluster
from common.protocol import Command, Task, TaskResult
from common.rpc import RpcClient

MODEL = "alexnet"
MODEL_R = "resnet50"  # (f)'s second job
# The plain loop's shapes, (processes, torch threads each): 2 threads in total either way. One process
# with 2 intra-op threads is the stated baseline; 2 single-thread processes is the cluster's own shape
# (no intra-op synchronisation), which a loaded machine penalises far less.
SHAPES_MAIN, SHAPES_ALT = "1 process x 2 threads", "2 processes x 1 thread"
SHAPES = {SHAPES_MAIN: (1, 2), SHAPES_ALT: (2, 1)}
NOOP = "noop"


# -- (a) ------------------------------------------------------------------------------------------
NATIVE = """
import json, sys, time
from pathlib import Path
import torch
from models import decode_image, get_classifier
model, threads, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
paths = [Path(p) for p in sys.argv[4:]]
torch.set_num_threads(threads)
clf = get_classifier(model, num_threads=threads)
clf.predict_batch([decode_image(p.read_bytes()) for p in paths[:batch]])  # warm-up, untimed
print("ready", flush=True)
sys.stdin.readline()  # go
t0, c0 = time.time(), time.process_time()
n = 0
for i in range(0, len(paths), batch):
    n += len(clf.predict_batch([decode_image(p.read_bytes()) for p in paths[i : i + batch]]))
print(json.dumps({"start": t0, "end": time.time(), "n": n, "cpu": time.process_time() - c0}), flush=True)
"""


def native(paths: list, batch: int, threads: int, model: str = MODEL, procs: int = 1) -> tuple[float, int, float]:
    """The plain loop (read, ``decode_image``, ``predict_batch``) in ``procs`` fresh processes of
    ``threads`` torch threads each, over ``paths`` split between them (contiguous shares, each a
    multiple of ``batch``), all started together once every one has its model built and warmed up.
    Returns (seconds from the first start to the last end, images, CPU seconds of the loops)."""
    per = math.ceil(len(paths) / procs / batch) * batch
    shares = [paths[k * per:(k + 1) * per] for k in range(procs)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDUNNO_")}
    children = [subprocess.Popen([sys.executable, "-c", NATIVE, model, str(threads), str(batch),
                                  *(str(p) for p in share)], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for share in shares if share]
    try:
        for c in children:
            assert c.stdout is not None
            if c.stdout.readline().strip() != "ready":
                raise RuntimeError(f"native {model} process failed to start")
        for c in children:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        out = [json.loads(c.communicate(timeout=1800)[0]) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    return (max(o["end"] for o in out) - min(o["start"] for o in out), sum(o["n"] for o in out),
            sum(o["cpu"] for o in out))


def idle_cpu_rate(cluster: LocalCluster, seconds: float = 2.0) -> float:
    """CPU seconds per second the idle cluster uses (loops, heartbeats, pulse sidecars)."""
    c0, t0 = cluster_cpu_seconds(cluster), time.monotonic()
    time.sleep(seconds)
    return (cluster_cpu_seconds(cluster) - c0) / (time.monotonic() - t0)


def run_job(cluster: LocalCluster, inputs: str, batch: int, timeout: float = 600, model: str = MODEL,
            idle_cpu: bool = False) -> dict:
    """One job, first dispatch -> last result; with ``idle_cpu``, first the idle cluster's CPU rate
    for 2 s ((a)'s CPU per image less the idle cost)."""
    idle = idle_cpu_rate(cluster) if idle_cpu else 0.0
    cpu0, t0 = cluster_cpu_seconds(cluster), time.monotonic()
    job = cluster.ctl("submit", model=model, inputs=inputs, batch=batch, start=True)["job_id"]

    def done() -> bool:
        c = cluster.ctl("completed", job=job, timeout=5.0)[job]
        return c["completed"] >= c["total"]

    wait_until(done, timeout, 0.25, f"job {job} to finish")
    cpu = cluster_cpu_seconds(cluster) - cpu0  # the whole cluster's, submit to done (idle heartbeats included)
    idle_used = idle * (time.monotonic() - t0)
    tl = cluster.ctl("timeline", job=job, timeout=10.0)["jobs"][job]
    spans = tl["spans"]
    first = min(s[1] for s in spans)
    last = max(s[2] for s in spans)
    n = sum(s[3] for s in spans)
    per_worker: dict[str, int] = {}
    for s in spans:
        per_worker[s[0]] = per_worker.get(s[0], 0) + s[3]
    return {"job": job, "n": n, "seconds": last - first, "per_worker": per_worker, "cpu": cpu, "idle_cpu": idle_used}


# -- (f) ------------------------------------------------------------------------------------------
def run_both(cluster: LocalCluster, inputs: str, batch: int, timeout: float = 900) -> dict:
    """(f): an AlexNet and a ResNet-50 job started together; images per job per second from the first
    dispatch of either to the last result of both."""
    jobs = [cluster.ctl("submit", model=m, inputs=inputs, batch=batch, start=False)["job_id"] for m in (MODEL, MODEL_R)]
    cluster.ctl("start")

    def done() -> bool:
        c = cluster.ctl("completed", timeout=5.0)
        return all(c[j]["completed"] >= c[j]["total"] for j in jobs)

    wait_until(done, timeout, 0.25, f"jobs {', '.join(jobs)} to finish")
    tl = cluster.ctl("timeline", timeout=10.0)["jobs"]
    spans = {j: tl[j]["spans"] for j in jobs}
    first = min(s[1] for sp in spans.values() for s in sp)
    last = max(s[2] for sp in spans.values() for s in sp)
    n = {j: sum(s[3] for s in sp) for j, sp in spans.items()}
    ends = {j: max(s[2] for s in sp) - first for j, sp in spans.items()}
    return {"jobs": jobs, "n": n, "seconds": last - first, "ends": ends}


def both_table(nat_a: dict[str, list[float]], nat_r: dict[str, list[float]], runs: list[dict], n_images: int,
               batch: int) -> tuple[float, dict[str, float]]:
    """(f)'s table; returns (cluster images per job per second, the fair ceiling per native shape)."""
    rates = [sum(x["n"].values()) / 2 / x["seconds"] for x in runs]
    rate = statistics.median(rates)
    med = runs[rates.index(rate)] if rate in rates else runs[0]
    rows: list[list] = []
    ceilings: dict[str, float] = {}
    for shape in SHAPES:
        a, r = statistics.median(nat_a[shape]), statistics.median(nat_r[shape])
        ceilings[shape] = 1 / (1 / a + 1 / r)
        rows += [[f"native A: {MODEL}, {shape}", ", ".join(f"{x:.1f}" for x in nat_a[shape]), a, "-"],
                 [f"native R: {MODEL_R}, {shape}", ", ".join(f"{x:.2f}" for x in nat_r[shape]), r, "-"],
                 [f"fair ceiling per job 1/(1/A + 1/R), {shape}", "-", ceilings[shape], 1.0]]
    rows.append(["cluster: images per job per second, first dispatch (either) -> last result (both)",
                 ", ".join(f"{x:.2f}" for x in rates), rate,
                 " / ".join(f"{rate / c:.2f}" for c in ceilings.values())])
    table(f"(f) both jobs: {MODEL} + {MODEL_R}, {n_images} images each, batch {batch}, submitted together "
          f"(median of {len(runs)} alternating rounds); goal: cluster >= 0.95x the fair ceiling",
          ["setup", "images/s per round", "median images/s", "x ceiling"], rows,
          caption=f"x ceiling: against each native shape in turn ({' / '.join(SHAPES)}). Median round: {MODEL} "
                  f"ended {med['ends'][med['jobs'][0]]:.1f} s and {MODEL_R} {med['ends'][med['jobs'][1]]:.1f} s "
                  f"after the first dispatch; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return rate, ceilings


# -- (b) ------------------------------------------------------------------------------------------
ECHO_WORKER = """
import sys, msgpack, zmq
port, reply_size = int(sys.argv[1]), int(sys.argv[2])
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(f"tcp://127.0.0.1:{port}")
sock.send(msgpack.packb({"t": "ready"}))
pad = "r" * reply_size
while True:
    body = msgpack.unpackb(sock.recv(), raw=False)
    if body.get("t") == "stop":
        break
    sock.send(msgpack.packb({"v": 1, "t": "result", "task_id": body["task_id"], "pad": pad}, use_bin_type=True))
sock.close(0)
ctx.term()
"""


def message_sizes(inputs: str) -> tuple[int, int]:
    """Encoded sizes of a batch-1 noop Task and its TaskResult, as the cluster sends them."""
    name = "job12-noop"
    task = Task(f"t1.123-{name}", name, NOOP, 1, [{"index": 123, "input": f"{inputs}0/img_0000.jpg", "version": 1}])
    result = TaskResult(task.task_id, name, "127.0.0.1:40000@1795861036168", 0.0001, [[123, [[NOOP, 1.0]], None]])
    return len(task.encode()), len(result.encode())


def raw_dispatch(n: int, workers: int, window: int, task_size: int, result_size: int) -> float:
    """Seconds for ``n`` ROUTER -> DEALER -> ROUTER round trips, ``window`` in flight per DEALER."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    procs = [subprocess.Popen([sys.executable, "-c", ECHO_WORKER, str(port), str(result_size)])
             for _ in range(workers)]
    pad = "t" * max(0, task_size - 40)
    idents: list[bytes] = []
    try:
        while len(idents) < workers:
            if not router.poll(30_000):
                raise RuntimeError("echo workers did not connect")
            idents.append(router.recv_multipart()[0])

        def run(count: int) -> float:
            sent = received = 0
            t0 = time.perf_counter()
            for ident in idents:
                for _ in range(min(window, count - sent)):
                    router.send_multipart([ident, msgpack.packb({"t": "task", "task_id": sent, "pad": pad})])
                    sent += 1
            while received < count:
                if not router.poll(5000):
                    raise RuntimeError("echo worker does not answer")
                ident, frame = router.recv_multipart()
                msgpack.unpackb(frame, raw=False)
                received += 1
                if sent < count:
                    router.send_multipart([ident, msgpack.packb({"t": "task", "task_id": sent, "pad": pad})])
                    sent += 1
            return time.perf_counter() - t0

        run(min(500, n))  # warm-up
        return run(n)
    finally:
        for ident in idents:
            router.send_multipart([ident, msgpack.packb({"t": "stop"})])
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        router.close(0)


# -- (c) ------------------------------------------------------------------------------------------
ECHO_SERVER = """
import sys, msgpack, zmq
reply_data = msgpack.unpackb(sys.stdin.buffer.read(), raw=False)
ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.setsockopt(zmq.LINGER, 0)
print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
while True:
    ident, frame = sock.recv_multipart()
    body = msgpack.unpackb(frame, raw=False)
    if body.get("t") == "stop":
        break
    sock.send_multipart([ident, msgpack.packb({"v": 1, "t": "ok", "req": body["req"], "data": reply_data},
                                              use_bin_type=True)])
sock.close(0)
ctx.term()
"""


def echo_round_trips(n: int, reply_data) -> tuple[float, int]:
    """The baseline: a bare ROUTER in its own process that decodes each request and encodes a reply."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        proc.stdin.write(msgpack.packb(reply_data, use_bin_type=True))
        proc.stdin.close()
        port = int(proc.stdout.readline())
        sock.connect(f"tcp://127.0.0.1:{port}")
        size = 0

        def one(i: int) -> int:
            sock.send(msgpack.packb({"v": 1, "t": "cmd", "req": i, "name": "members", "args": {}}, use_bin_type=True))
            if not sock.poll(5000):
                raise RuntimeError("echo server does not answer")
            frame = sock.recv()
            if msgpack.unpackb(frame, raw=False)["req"] != i:
                raise RuntimeError("echo reply out of order")
            return len(frame)

        for i in range(min(200, n)):  # warm-up
            one(i)
        t0 = time.perf_counter()
        for i in range(n):
            size = one(i)
        elapsed = time.perf_counter() - t0
        sock.send(msgpack.packb({"t": "stop"}))
        return elapsed, size
    finally:
        sock.close(0)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def rpc_round_trips(cluster: LocalCluster, n: int) -> tuple[float, int]:
    cfg = cluster.config()
    client = RpcClient([cluster.coordinator], cfg)
    try:
        for _ in range(min(200, n)):  # warm-up
            client.call(Command(0, "members", {}), timeout=5.0)
        t0 = time.perf_counter()
        for _ in range(n):
            reply = client.call(Command(0, "members", {}), timeout=5.0)
        elapsed = time.perf_counter() - t0
        return elapsed, len(reply.encode())
    finally:
        client.close()


# -- (d) ------------------------------------------------------------------------------------------
CLI_GOAL = 0.15  # seconds over `python -c pass`


def cli_round_trips(cluster: LocalCluster, n: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall seconds and CPU seconds (user + system, which a busy shared machine inflates less) of whole
    processes: the baseline interpreter and two `idunno ctl jobs` forms."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDUNNO_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["IDUNNO_CURVE_DIR"] = cluster.curve_dir  # the cluster's keys ("" for an --insecure cluster)
    ctl = [sys.executable, "-m", "cli.main", "ctl", "jobs", "--coordinator", cluster.coordinator]
    cmds = {"python -c pass": [sys.executable, "-c", "pass"], "idunno ctl jobs --json": [*ctl, "--json"],
            "idunno ctl jobs (table)": ctl}
    for argv in cmds.values():  # untimed: writes the bytecode cache, as any first run on a machine does
        subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, check=True)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(n):
        for name, argv in cmds.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            r = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True)
            times[name].append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            if r.returncode != 0:
                raise RuntimeError(f"{name} failed: {r.stderr.decode()}")
    return times, cpu


def cli_table(times: dict[str, list[float]], cpu: dict[str, list[float]]) -> tuple[float, float]:
    base = statistics.median(times["python -c pass"])
    base_cpu = statistics.median(cpu["python -c pass"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append([name, len(ts), med, min(ts), max(ts), med - base, statistics.median(cpu[name]),
                     statistics.median(cpu[name]) - base_cpu,
                     "baseline" if name == "python -c pass" else ("yes" if med - base <= CLI_GOAL else "NO")])
    table(f"(d) CLI round trip: seconds of a whole process (median of {len(times['python -c pass'])}, "
          f"alternating); goal: wall time <= {CLI_GOAL} s over `python -c pass`",
          ["command", "runs", "wall median", "wall min", "wall max", "wall over baseline", "CPU median",
           "CPU over baseline", "within goal"], rows,
          caption=f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return base, statistics.median(times["idunno ctl jobs --json"]) - base


def cli_only(n: int) -> int:
    with temp_dir("idunno-bench-cli-") as tmp:
        cluster = LocalCluster(workers=1, standby=True, data_dir=str(tmp), torch_threads=1)
        with running(cluster, timeout=120):
            console.print(f"(d) {n} x (python -c pass, idunno ctl jobs --json, idunno ctl jobs) against a 1-worker "
                          f"cluster with standby")
            times, cpu = cli_round_trips(cluster, n)
    base, over = cli_table(times, cpu)
    headline(f"CLI round trip `idunno ctl jobs --json` {base + over:.3f} s = python -c pass ({base:.3f} s) "
             f"+ {over:.3f} s (goal <= +{CLI_GOAL} s)")
    return 0


# -- (e) ------------------------------------------------------------------------------------------
def put_rate(cluster: LocalCluster, path: str, name: str) -> float:
    from sdfs.client import SdfsClient  # noqa: PLC0415

    size = os.path.getsize(path)
    with SdfsClient(cluster.config()) as client:
        t0 = time.perf_counter()
        client.put(path, name)
        return size / (time.perf_counter() - t0) / 1e6


def curve_cost(repeat: int, round_trips: int, noop_copies: int) -> list[list]:
    """(e): CURVE against --insecure, alternating rounds on two idle clusters of the same shape."""
    measured: dict[bool, dict[str, list[float]]] = {m: {"noop": [], "rpc": [], "put": []} for m in (True, False)}
    with temp_dir("idunno-bench-curve-") as tmp:
        blob = tmp / "blob.bin"
        blob.write_bytes(os.urandom(32 << 20))
        clusters = {insecure: LocalCluster(workers=2, standby=False, data_dir=str(tmp / f"c-{insecure}"),
                                           torch_threads=1, insecure=insecure) for insecure in (True, False)}
        with running(clusters[True], timeout=120), running(clusters[False], timeout=120):
            for c in clusters.values():
                put_copies(c, noop_copies, "np")
                run_job(c, "np/0/img_00*", 1, model=NOOP)  # warm-up, untimed
                put_rate(c, str(blob), "warm.bin")
            for r in range(repeat):
                for insecure, c in clusters.items():
                    m = measured[insecure]
                    job = run_job(c, "np/", 1, model=NOOP)
                    m["noop"].append(job["n"] / job["seconds"])
                    rpc_s, _ = rpc_round_trips(c, round_trips)
                    m["rpc"].append(round_trips / rpc_s)
                    m["put"].append(put_rate(c, str(blob), f"blob{r}.bin"))
                plain, curve = measured[True], measured[False]
                console.print(f"    round {r + 1}/{repeat}: noop queries/s plain {plain['noop'][-1]:,.0f} "
                              f"CURVE {curve['noop'][-1]:,.0f}; put MB/s plain {plain['put'][-1]:.1f} "
                              f"CURVE {curve['put'][-1]:.1f}")
    rows = []
    for key, what in (("noop", "noop dispatch, queries/s"), ("rpc", "'members' RPC, round trips/s"),
                      ("put", "SDFS put of 32 MB (RF 4), MB/s")):
        plain, curve = statistics.median(measured[True][key]), statistics.median(measured[False][key])
        rows.append([what, plain, curve, curve / plain])
    return rows


def curve_table(rows: list[list], repeat: int) -> None:
    table(f"(e) the cost of encryption: CURVE (default) against --insecure (baseline), median of {repeat} "
          f"alternating rounds", ["measure", "--insecure", "CURVE", "x --insecure"], rows)


def noop_rounds(cluster: LocalCluster, workers: int, repeat: int, raw_n: int) -> tuple[list[float], list[dict]]:
    """(b)'s rounds: raw round trips, then a noop job over ``np/``, alternating."""
    run_job(cluster, "np/0/img_00*", 1, model=NOOP)  # warm-up, untimed
    task_size, result_size = message_sizes("np/")
    noop_runs: list[dict] = []
    raw_runs: list[float] = []
    for r in range(repeat):
        raw_runs.append(raw_n / raw_dispatch(raw_n, workers, cluster.config().worker_credit, task_size, result_size))
        noop_runs.append(run_job(cluster, "np/", 1, model=NOOP))
        console.print(f"    round {r + 1}/{repeat}: raw {raw_runs[-1]:,.0f} round trips/s, noop job "
                      f"{noop_runs[-1]['n'] / noop_runs[-1]['seconds']:,.0f} queries/s")
    return raw_runs, noop_runs


def dispatch_only(repeat: int, noop_copies: int, raw_n: int) -> int:
    """Only (b), on a 2-worker cluster of its own (no model preloaded)."""
    workers = 2
    with temp_dir("idunno-bench-dispatch-") as tmp:
        cluster = LocalCluster(workers=workers, standby=False, data_dir=str(tmp), torch_threads=1)
        with running(cluster, timeout=120):
            n_noop, put_s = put_copies(cluster, noop_copies, "np")
            console.print(f"(b) noop jobs over {n_noop} inputs (put in {put_s:.1f}s), batch 1, alternating with "
                          f"{raw_n} raw ROUTER->DEALER round trips; load average {os.getloadavg()[0]:.2f}")
            raw_runs, noop_runs = noop_rounds(cluster, workers, repeat, raw_n)
            credit = cluster.config().worker_credit
    noop_rates = [r["n"] / r["seconds"] for r in noop_runs]
    noop_rate, raw_rate = statistics.median(noop_rates), statistics.median(raw_runs)
    table(f"(b) dispatch rate: {n_noop} queries a job, batch 1, {workers} workers x credit {credit} "
          f"(median of {repeat} alternating rounds)", ["path", "per round / s", "median / s", "us per query", "x raw"],
          [["baseline: raw ROUTER -> DEALER round trips", ", ".join(f"{x:,.0f}" for x in raw_runs), raw_rate,
            1e6 / raw_rate, 1.0],
           ["cluster: noop-model job, first dispatch -> last result", ", ".join(f"{x:,.0f}" for x in noop_rates),
            noop_rate, 1e6 / noop_rate, noop_rate / raw_rate]])
    headline(f"noop dispatch {noop_rate:,.0f} queries/s = {noop_rate / raw_rate:.2f}x raw ROUTER-DEALER "
             f"({raw_rate:,.0f}/s; goal >= 0.5x or >= 10,000/s); load average {os.getloadavg()[0]:.2f}")
    return 0


def a_table(nat_runs: dict[str, list[tuple[float, int, float]]], clu_runs: list[dict], paths: list, repeat: int,
            batch: int, workers: int, threads: int) -> tuple[dict[str, float], float]:
    """(a)'s table; returns (native median images/s per shape, cluster median images/s)."""
    nat_rates = {shape: [n / sec for sec, n, _ in runs] for shape, runs in nat_runs.items()}
    cpu_ms = {shape: statistics.median(1000 * cpu / n for _, n, cpu in runs) for shape, runs in nat_runs.items()}
    nat = {shape: statistics.median(rates) for shape, rates in nat_rates.items()}
    clu_rates = [r["n"] / r["seconds"] for r in clu_runs]
    clu_rate = statistics.median(clu_rates)
    res = clu_runs[clu_rates.index(clu_rate)] if clu_rate in clu_rates else clu_runs[0]
    clu_cpu = statistics.median(1000 * r["cpu"] / r["n"] for r in clu_runs)
    clu_busy = statistics.median(1000 * (r["cpu"] - r["idle_cpu"]) / r["n"] for r in clu_runs)
    rows: list[list] = [[f"native: {shape}, read+decode+predict", ", ".join(f"{x:.1f}" for x in nat_rates[shape]),
                         nat[shape], "1.00" if k == 0 else f"{nat[shape] / nat[SHAPES_MAIN]:.2f}", cpu_ms[shape],
                         "-"]
                        for k, shape in enumerate(SHAPES)]
    rows.append([f"cluster: {workers} workers x torch_threads={threads}, first dispatch -> last result",
                 ", ".join(f"{x:.1f}" for x in clu_rates), clu_rate,
                 " / ".join(f"{clu_rate / v:.2f}" for v in nat.values()), clu_cpu,
                 " / ".join(f"{clu_cpu / v:.2f}" for v in cpu_ms.values())])
    rows.append(["cluster, less its idle CPU (measured for 2 s before each job)", "-", "-", "-", clu_busy,
                 " / ".join(f"{clu_busy / v:.2f}" for v in cpu_ms.values())])
    table(f"(a) {MODEL} images/s with 2 CPU threads in total (batch {batch}, {len(paths)} images, "
          f"median of {repeat} alternating rounds)", ["setup", "images/s per round", "median images/s", "x native",
                                                      "CPU ms per image", "CPU x native"],
          rows, caption=f"x native: against each native shape in turn ({' / '.join(SHAPES)}). CPU: the loops' "
                        "own CPU time; the cluster's is every cluster process (coordinators, workers, their "
                        "children) from submit to done. Cluster per-worker "
                        "images (median round): "
                        + ", ".join(f"{w}: {n}" for w, n in sorted(res["per_worker"].items())))
    return nat, clu_rate


def jobs_report(nat_runs: dict[str, list[tuple[float, int, float]]], clu_runs: list[dict], paths: list, repeat: int,
                batch: int, workers: int, threads: int,
                both: tuple[dict[str, list[float]], dict[str, list[float]], list[dict], int]) -> int:
    """--jobs-only: (a) and (f)."""
    nat, clu_rate = a_table(nat_runs, clu_runs, paths, repeat, batch, workers, threads)
    nat_a, nat_r, both_runs, n_both = both
    both_rate, ceilings = both_table(nat_a, nat_r, both_runs, n_both, batch)
    headline(f"{a_headline(nat, clu_rate)}; {both_headline(both_rate, ceilings)}; load average "
             f"{os.getloadavg()[0]:.1f}")
    return 0


def a_headline(nat: dict[str, float], clu_rate: float) -> str:
    return (f"cluster {MODEL} {clu_rate:.1f} images/s = {clu_rate / nat[SHAPES_MAIN]:.2f}x the plain loop in one "
            f"process ({nat[SHAPES_MAIN]:.1f} images/s, 2 threads; goal >= 0.95x), "
            f"{clu_rate / nat[SHAPES_ALT]:.2f}x the plain loop in {SHAPES_ALT} ({nat[SHAPES_ALT]:.1f} images/s)")


def both_headline(rate: float, ceilings: dict[str, float]) -> str:
    return (f"{MODEL} + {MODEL_R} together {rate:.2f} images per job per second = "
            f"{rate / ceilings[SHAPES_MAIN]:.2f}x the fair ceiling 1/(1/A + 1/R) = {ceilings[SHAPES_MAIN]:.2f} of the "
            f"one-process loop, {rate / ceilings[SHAPES_ALT]:.2f}x {ceilings[SHAPES_ALT]:.2f} of {SHAPES_ALT} "
            f"(goal >= 0.95x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 images, 2000 round trips")
    ap.add_argument("--images", type=int, default=None, help="images in the job, a multiple of 100 (default 300)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--round-trips", type=int, default=None, help="(b) round trips (default 10000, quick 2000)")
    ap.add_argument("--noop-queries", type=int, default=None,
                    help="(b) queries in each noop job, a multiple of 100 (default 1000, quick 200)")
    ap.add_argument("--repeat", type=int, default=None, help="(a) rounds of native + cluster (default 3, quick 1)")
    ap.add_argument("--standby", action="store_true", help="run the cluster with a hot standby (default: none)")
    ap.add_argument("--workers", type=int, default=2, help="(a), (f): the cluster's workers (default 2)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="(a), (f): torch threads per worker (default 1; --workers 1 --torch-threads 2 is the "
                         "one-process loop's shape)")
    ap.add_argument("--cli-runs", type=int, default=None, help="(d) runs of each process (default 30, quick 10)")
    ap.add_argument("--cli-only", action="store_true", help="only (d), on a small cluster of its own")
    ap.add_argument("--curve-only", action="store_true", help="only (e), on two small clusters of its own")
    ap.add_argument("--jobs-only", action="store_true", help="only (a) and (f) (the model jobs)")
    ap.add_argument("--both-images", type=int, default=None,
                    help="(f) images in each of the two jobs, <= 100 (default 100, quick 20)")
    ap.add_argument("--dispatch-only", action="store_true",
                    help="only (b), on a 2-worker cluster of its own (IDUNNO_PROFILE=path profiles its coordinator)")
    args = ap.parse_args()
    cli_runs = args.cli_runs or (10 if args.quick else 30)
    if args.cli_only:
        return cli_only(cli_runs)
    curve_rounds = args.repeat or (1 if args.quick else 3)
    curve_trips = (args.round_trips or (2000 if args.quick else 10_000)) // 2
    curve_copies = max(1, math.ceil((args.noop_queries or (200 if args.quick else 1000)) / 100))
    if args.dispatch_only:
        return dispatch_only(args.repeat or (1 if args.quick else 3), curve_copies, 2000 if args.quick else 10_000)
    if args.curve_only:
        rows = curve_cost(curve_rounds, curve_trips, curve_copies)
        curve_table(rows, curve_rounds)
        headline("CURVE costs: " + "; ".join(f"{r[0]} {r[3]:.2f}x --insecure" for r in rows))
        return 0
    n_images = args.images or (100 if args.quick else 300)
    copies = max(1, math.ceil(n_images / 100))
    round_trips = args.round_trips or (2000 if args.quick else 10_000)
    repeat = args.repeat or (1 if args.quick else 3)
    noop_copies = max(1, math.ceil((args.noop_queries or (200 if args.quick else 1000)) / 100))
    raw_n = 2000 if args.quick else 10_000
    workers, threads = args.workers, args.torch_threads

    files = images()
    paths = [p for _ in range(copies) for p in files]
    n_both = min(100, args.both_images or (20 if args.quick else 100))
    # (f)'s inputs: the first n_both of tp/0/ (names img_000 ... img_099).
    both_glob = "tp/0/" if n_both == 100 else f"tp/0/img_0[0-{n_both // 10 - 1}]*"
    n_both = 100 if n_both == 100 else n_both // 10 * 10
    nat_runs: dict[str, list[tuple[float, int, float]]] = {shape: [] for shape in SHAPES}
    clu_runs: list[dict] = []
    nat_a: dict[str, list[float]] = {shape: [] for shape in SHAPES}
    nat_r: dict[str, list[float]] = {shape: [] for shape in SHAPES}
    both_runs: list[dict] = []
    with temp_dir("idunno-bench-throughput-") as tmp:
        cluster = LocalCluster(workers=workers, standby=args.standby, data_dir=str(tmp), torch_threads=threads,
                               env={"IDUNNO_PRELOAD_MODELS": f"{MODEL},{MODEL_R}"})
        with running(cluster, timeout=120):
            wait_models(cluster, [MODEL, MODEL_R], workers)
            n_put, put_s = put_copies(cluster, copies, "tp")
            console.print(f"(a) {len(paths)} images, batch {args.batch}; cluster of {workers} workers x {threads} "
                          f"torch thread ({n_put} inputs put in {put_s:.1f}s); {repeat} rounds of native then cluster")
            warm = run_job(cluster, "tp/0/img_00*", args.batch)
            console.print(f"    cluster warm-up job {warm['job']}: {warm['n']} images")
            # Native and cluster runs alternate, so both see the same machine; the idle cluster only
            # exchanges heartbeats while the native loop runs.
            for r in range(repeat):
                for shape, (procs, n_threads) in SHAPES.items():
                    nat_runs[shape].append(native(paths, args.batch, n_threads, procs=procs))
                clu_runs.append(run_job(cluster, "tp/", args.batch, idle_cpu=True))
                console.print(f"    round {r + 1}/{repeat}: native "
                              + ", ".join(f"{sh} {v[-1][1] / v[-1][0]:.1f}" for sh, v in nat_runs.items())
                              + f" images/s, cluster {clu_runs[-1]['n'] / clu_runs[-1]['seconds']:.1f} images/s")
            console.print(f"(f) {MODEL} + {MODEL_R} jobs over {n_both} images each ({both_glob}), batch {args.batch}; "
                          f"{repeat} rounds of native {MODEL}, native {MODEL_R}, then both on the cluster")
            warm_both = run_both(cluster, "tp/0/img_00*", args.batch)  # untimed: the ResNet-50 path warms up
            console.print(f"    cluster warm-up jobs {', '.join(warm_both['jobs'])}")
            both_paths = files[:n_both]
            for r in range(repeat):
                for shape, (procs, n_threads) in SHAPES.items():
                    sec, n, _ = native(both_paths, args.batch, n_threads, procs=procs)
                    nat_a[shape].append(n / sec)
                    sec, n, _ = native(both_paths, args.batch, n_threads, MODEL_R, procs=procs)
                    nat_r[shape].append(n / sec)
                both_runs.append(run_both(cluster, both_glob, args.batch))
                per_job = sum(both_runs[-1]["n"].values()) / 2 / both_runs[-1]["seconds"]
                console.print(f"    round {r + 1}/{repeat}: native {MODEL} "
                              + ", ".join(f"{sh} {v[-1]:.1f}" for sh, v in nat_a.items()) + f"; {MODEL_R} "
                              + ", ".join(f"{sh} {v[-1]:.2f}" for sh, v in nat_r.items())
                              + f" images/s; cluster both {per_job:.2f} images per job per second")
            if args.jobs_only:
                return jobs_report(nat_runs, clu_runs, paths, repeat, args.batch, workers, threads,
                                   (nat_a, nat_r, both_runs, n_both))
            time.sleep(1.0)  # let the coordinator write the jobs' results to SDFS before (b)
            n_noop, put_s = put_copies(cluster, noop_copies, "np")
            console.print(f"(b) noop jobs over {n_noop} inputs (put in {put_s:.1f}s), batch 1, alternating with "
                          f"{raw_n} raw ROUTER->DEALER round trips")
            raw_runs, noop_runs = noop_rounds(cluster, workers, repeat, raw_n)
            task_size, result_size = message_sizes("np/")
            time.sleep(1.0)
            members_data = cluster.ctl("members")
            console.print(f"(c) {round_trips} round trips: pyzmq+msgpack echo, then RpcClient 'members'")
            echo_s, echo_size = echo_round_trips(round_trips, members_data)
            rpc_s, rpc_size = rpc_round_trips(cluster, round_trips)
            console.print(f"(d) {cli_runs} x (python -c pass, idunno ctl jobs --json, idunno ctl jobs)")
            cli_times, cli_cpu = cli_round_trips(cluster, cli_runs)
    console.print(f"(e) CURVE against --insecure: {curve_rounds} alternating rounds on two 2-worker clusters")
    curve_rows = curve_cost(curve_rounds, curve_trips, curve_copies)

    nat, clu_rate = a_table(nat_runs, clu_runs, paths, repeat, args.batch, workers, threads)
    both_rate, ceilings = both_table(nat_a, nat_r, both_runs, n_both, args.batch)
    noop_rates = [r["n"] / r["seconds"] for r in noop_runs]
    noop_rate, raw_rate = statistics.median(noop_rates), statistics.median(raw_runs)
    table(
        f"(b) dispatch rate: {n_noop} queries a job, batch 1, {workers} workers x credit "
        f"{cluster.config().worker_credit} (median of {repeat} alternating rounds)",
        ["path", "per round / s", "median / s", "us per query", "x raw"],
        [
            [f"baseline: raw ROUTER -> {workers} DEALER processes, same window, {task_size} B out / "
             f"{result_size} B back", ", ".join(f"{x:,.0f}" for x in raw_runs), raw_rate, 1e6 / raw_rate, 1.0],
            ["cluster: noop-model job, first dispatch -> last result",
             ", ".join(f"{x:,.0f}" for x in noop_rates), noop_rate, 1e6 / noop_rate, noop_rate / raw_rate],
        ],
    )
    echo_rate, rpc_rate = round_trips / echo_s, round_trips / rpc_s
    table(
        "(c) request/reply overhead of the control path",
        ["path", "round trips", "seconds", "round trips/s", "us per round trip", "reply bytes", "x echo"],
        [
            ["baseline: pyzmq DEALER->ROUTER echo, msgpack, same reply size", round_trips, echo_s, echo_rate,
             echo_s / round_trips * 1e6, echo_size, 1.0],
            ["RpcClient -> primary coordinator, Command('members')", round_trips, rpc_s, rpc_rate,
             rpc_s / round_trips * 1e6, rpc_size, rpc_rate / echo_rate],
        ],
    )
    cli_base, cli_over = cli_table(cli_times, cli_cpu)
    curve_table(curve_rows, curve_rounds)
    headline(f"{a_headline(nat, clu_rate)}; noop dispatch {noop_rate:,.0f} queries/s = "
             f"{noop_rate / raw_rate:.2f}x raw ROUTER-DEALER ({raw_rate:,.0f}/s; goal >= 0.5x); 'members' RPC "
             f"{rpc_rate:,.0f} round trips/s = {rpc_rate / echo_rate:.2f}x raw echo ({echo_rate:,.0f}/s); CLI "
             f"`ctl jobs --json` {cli_base + cli_over:.3f} s = python -c pass + {cli_over:.3f} s "
             f"(goal <= +{CLI_GOAL} s); {both_headline(both_rate, ceilings)}; CURVE: "
             + "; ".join(f"{r[0]} {r[3]:.2f}x --insecure" for r in curve_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
