"""Every listening socket of every daemon gets >= 10k hostile frames; nobody dies or bloats; nobody is impersonated."""

from __future__ import annotations

import io
import random
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from conftest import DATA, wait_for

from cli.logs import stream_logs
from common import protocol as P
from common import security
from common.transport import offset_addr, tcp
from sdfs.client import SdfsClient

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def hostile_frames(rnd: random.Random, n: int) -> list[bytes]:
    valid = [
        P.Join("127.0.0.1:1@1", "worker", "127.0.0.1:1").encode(),
        P.Heartbeat("127.0.0.1:9@9").encode(),
        P.TaskResult("t9.9-nojob", "nojob", "127.0.0.1:9@9", 0.1, [[1, None, None]]).encode(),
        P.Stored("127.0.0.1:9@9", "nofile", 3, 10, "00").encode(),
        P.WriteChunk(1, "x/y", 1, 5, b"abc", 10, "00", False).encode(),
        P.ReadChunk(2, "no/such", 1, 0, 1 << 20).encode(),
        P.Command(3, "set_batch_size", {"job": "nope", "n": -1}).encode(),
        P.PutCommit(4, [{"put_id": "forged", "stored": ["a"]}]).encode(),
        P.LogRecord("fuzzer", 0.0, "INFO", "fuzz", "x" * 100).encode(),
        P.Pulse("127.0.0.1:9@9").encode(),
        P.PutReplace(5, [{"put_id": "forged", "exclude": [], "count": 2**40}]).encode(),
    ]
    frames = []
    for _ in range(n):
        kind = rnd.randrange(6)
        if kind == 0:
            frames.append(rnd.randbytes(rnd.randint(0, 200)))
        elif kind == 1:
            v = rnd.choice(valid)
            frames.append(v[: rnd.randint(0, len(v) - 1)])  # truncated msgpack
        elif kind == 2:
            frames.append(b"\xc6\xff\xff\xff\xf0" + rnd.randbytes(8))  # bin32 claiming ~4 GB
        elif kind == 3:
            body = msgpack.unpackb(rnd.choice(valid), raw=False)
            key = rnd.choice([k for k in body if k not in ("v", "t")] or ["v"])
            body[key] = rnd.choice([None, -1, 2**63 - 1, "s", b"b", [1], {"k": 1}, 1.5, True])
            frames.append(msgpack.packb(body))  # wrong field types
        elif kind == 4:
            frames.append(msgpack.packb({"v": 1, "t": rnd.choice(["nope", "task", "welcome"]), "x": 1}))
        else:
            frames.append(rnd.choice(valid))  # well-formed but wrong ids / unknown things
    return frames


def forged_identity_frames(rnd: random.Random, node_ids: list[str], job: str, total: int,
                           n: int) -> list[bytes]:
    """Well-formed messages of every type that names a node, each naming a node that is not the sender."""
    def result(node: str) -> P.Message:
        return P.TaskResult(f"t1.{rnd.randint(1, 50)}-{job}", job, node, rnd.random(),
                            [[i, [["FORGED", 1.0]], None] for i in range(total)])

    makers = [
        result,
        lambda node: P.Leave(node),
        lambda node: P.Heartbeat(node, busy=rnd.randint(0, 99)),
        lambda node: P.Ready(node, rnd.randint(0, 64), ["noop"]),
        lambda node: P.Stored(node, "in/forged.jpg", 1, 10, "00" * 32, ok=rnd.random() < 0.5, error="forged"),
        lambda node: P.Join(node, "worker", "127.0.0.1:1", inflight=[f"t1.1-{job}"]),
    ]
    return [rnd.choice(makers)(rnd.choice(node_ids)).encode() for _ in range(n)]


def keyed_socket(kind: int, max_frame: int, curve: security.Curve | None, identity: bytes | None = None,
                 peer: str = security.COORDINATOR) -> zmq.Socket:
    """A socket holding one of the cluster's keys: the hostile frames come from inside the trust boundary."""
    s = zmq.Context.instance().socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, max_frame)
    security.apply(s, False, curve, peer)
    if identity is not None:
        s.setsockopt(zmq.IDENTITY, identity)
    return s


def test_messages_naming_another_node_are_all_refused(make_cluster):
    """Every message type that carries a node id, sent with a real worker's id from another sender:
    a client key (refused for its role) and a worker key speaking for another node (refused by name)."""
    c = make_cluster(workers=2)
    rnd = random.Random(13)
    with SdfsClient(c.config()) as client:
        client.put_many([(str(p), f"in/{p.name}") for p in sorted(DATA.glob("*.jpg"))[:4]])
    job = c.ctl("submit", model="noop", inputs="in/", batch=1)["job_id"]  # queued: no task is out yet
    members = {m["node_id"]: m for m in c.alive_workers()}
    assert len(members) == 2
    sent, counted = [], []
    client_key, worker_key = (security.load(c.curve_dir, r) for r in (security.CLIENT, security.WORKER))
    # Senders: anonymous DEALERs, and ones whose identity is a node id that is not a member.
    for identity, curve in ((None, client_key), (b"127.0.0.1:1@1", client_key), (None, worker_key),
                            (b"127.0.0.1:1@1", worker_key)):
        frames = forged_identity_frames(rnd, list(members), job, 4, 1000)
        reply = blast(c.coordinator, zmq.DEALER, frames, P.Command(779, "info"), identity=identity, curve=curve)
        assert isinstance(reply, P.Ok)
        sent.append(len(frames) + (sent[-1] if sent else 0))
        drops = reply.data.get("dropped", {})
        counted.append(drops.get("forged_sender", 0) + drops.get("wrong_role", 0))
    assert reply.data["dropped"]["wrong_role"] == 2000 and reply.data["dropped"]["forged_sender"] == 2000
    assert c.ctl("completed", job=job)[job]["completed"] == 0  # 0 forged results accepted
    assert {m["node_id"]: m for m in c.alive_workers()} == members  # no forged Leave/Join/Heartbeat took
    assert all(p.popen.poll() is None for p in c.procs)
    assert counted == sent  # each one refused, and counted (visible in `info`)
    c.ctl("start")
    wait_for(lambda: c.ctl("completed", job=job)[job]["completed"] == 4, timeout=60, what="the real results")
    results = c.ctl("results", job=job)["results"]
    assert sorted(r["qid"] for r in results) == [f"{job}:{i}" for i in range(4)]
    assert all(r["top5"] == [["noop", 1.0]] for r in results)


def blast(addr: str, kind: int, frames: list[bytes], probe: P.Message, timeout: float = 60.0,
          identity: bytes | None = None, curve: security.Curve | None = None,
          peer: str = security.COORDINATOR) -> P.Message:
    """Send every frame, then a well-formed probe on the same pipe; its reply proves all were processed."""
    s = keyed_socket(kind, 8 << 20, curve, identity=identity, peer=peer)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(tcp(addr))
    try:
        for f in frames:
            s.send(f)
        s.send(probe.encode())
        while s.poll(int(timeout * 1000)):
            reply = P.decode(s.recv())
            if getattr(reply, "req", None) == probe.req:
                return reply
        raise AssertionError(f"{addr} stopped answering after the fuzz frames")
    finally:
        s.close(0)


def test_ten_thousand_hostile_frames_per_socket(make_cluster, tmp_path):
    c = make_cluster(workers=3)
    rnd = random.Random(2026)
    # Workers import torch in the background at start: take the baseline once memory has settled.
    def settled():
        first = {p.popen.pid: rss_kb(p.popen.pid) for p in c.procs}
        time.sleep(1.0)  # two samples a second apart
        second = {p.popen.pid: rss_kb(p.popen.pid) for p in c.procs}
        return second if all(abs(second[k] - first[k]) < 5_000 for k in first) else None

    before = wait_for(settled, timeout=60, interval=0, what="daemon memory to settle")
    workers = c.worker_procs()
    client_key, worker_key = (security.load(c.curve_dir, r) for r in (security.CLIENT, security.WORKER))
    assert isinstance(blast(c.coordinator, zmq.DEALER, hostile_frames(rnd, 10_000), P.Command(777, "jobs"),
                            curve=client_key), P.Ok)
    for w in workers:
        assert isinstance(blast(w.addr, zmq.DEALER, hostile_frames(rnd, 10_000), P.StoreList(778), curve=client_key,
                                peer=security.DATA), P.Ok)
    # The log PULL socket (node keys only) has no replies: push the garbage, then prove the stream still flows.
    push = keyed_socket(zmq.PUSH, 8 << 20, worker_key)
    push.connect(tcp(offset_addr(c.coordinator, 2)))
    for f in hostile_frames(rnd, 10_000):
        push.send(f)
    push.close(linger=5000)
    out = io.StringIO()
    t = threading.Thread(target=stream_logs, args=(c.config(),),
                         kwargs={"out": out, "duration": 30, "count": 1, "grep": "after-fuzz-marker"})
    t.start()
    time.sleep(0.5)  # subscription handshake before the marker is pushed
    marker = keyed_socket(zmq.PUSH, 8 << 20, worker_key)
    marker.connect(tcp(offset_addr(c.coordinator, 2)))
    marker.send(P.LogRecord("fuzzer", time.time(), "INFO", "fuzz", "after-fuzz-marker").encode())
    marker.close(linger=2000)
    t.join()
    assert "after-fuzz-marker" in out.getvalue()
    # Every daemon is alive, memory stayed bounded, and well-formed traffic still works.
    assert all(p.popen.poll() is None for p in c.procs)
    assert len(c.alive_workers()) == 3
    after = {p.popen.pid: rss_kb(p.popen.pid) for p in c.procs}
    for pid, kb in after.items():
        assert kb - before[pid] < 50_000, f"pid {pid} grew by {kb - before[pid]} kB"
    src = tmp_path / "ok.bin"
    src.write_bytes(rnd.randbytes(300_000))
    with SdfsClient(c.config()) as client:
        client.put(src, "after/fuzz.bin")
        client.get("after/fuzz.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_oversized_log_records_are_refused_at_the_transport(make_cluster):
    """A log pusher sending megabyte "records" cannot bloat the coordinator or hold up its loop."""
    c = make_cluster(workers=1)
    coordinator = next(p for p in c.procs if p.addr == c.coordinator)
    before = rss_kb(coordinator.popen.pid)
    worker_key = security.load(c.curve_dir, security.WORKER)
    push = keyed_socket(zmq.PUSH, 64 << 20, worker_key)
    push.connect(tcp(offset_addr(c.coordinator, 2)))
    big = P.LogRecord("fuzzer", 0.0, "INFO", "fuzz", "x" * (4 << 20)).encode()
    for _ in range(20):
        try:
            push.send(big, flags=zmq.NOBLOCK)
        except zmq.Again:
            break  # the coordinator dropped the connection: nothing more gets through
    push.close(linger=2000)
    # Ordinary records from a well-behaved pusher still flow afterwards.
    out = io.StringIO()
    t = threading.Thread(target=stream_logs, args=(c.config(),),
                         kwargs={"out": out, "duration": 30, "count": 1, "grep": "after-big-marker"})
    t.start()
    marker = keyed_socket(zmq.PUSH, 8 << 20, worker_key)
    marker.connect(tcp(offset_addr(c.coordinator, 2)))
    try:
        wait_for(lambda: (marker.send(P.LogRecord("ok", time.time(), "INFO", "t", "after-big-marker").encode())
                          or not t.is_alive() or "after-big-marker" in out.getvalue()),
                 timeout=30, interval=0.5, what="a normal record to reach the log stream")
    finally:
        t.join()
        marker.close(0)
    assert "after-big-marker" in out.getvalue()
    assert "x" * 1000 not in out.getvalue()
    grown = rss_kb(coordinator.popen.pid) - before
    assert grown < 30_000, f"coordinator grew by {grown} kB"
    assert c.ctl("info")["slowest_message"]["seconds"] < 1.0
