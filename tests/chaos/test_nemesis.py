"""Nemesis scenarios on an 8-worker cluster where every node has its own network namespace and IP."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import DATA, wait_for
from netns import History, Netns, NetnsCluster, check_history, netns_available

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

SKIP = netns_available()
IMAGES = sorted(DATA.glob("*.jpg"))
N = 48


@pytest.fixture
def hosts(tmp_path):
    if SKIP:
        pytest.skip(SKIP)
    net = Netns(n_hosts=11).create()  # client, 2 coordinators, 8 workers
    cluster = NetnsCluster(net, workers=8, data_dir=tmp_path, env={"IDUNNO_PRELOAD_MODELS": "alexnet"})
    try:
        yield cluster.start(), History(), tmp_path
    finally:
        cluster.stop()
        net.destroy()


def report(scenario: str, h: History, **seconds: float) -> None:
    """One line per scenario for the README table (shown with `pytest -s`); the asserts are the test
    (check_history: every query accepted exactly once, by the coordinator's own counts)."""
    detail = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in seconds.items())
    dropped = sum(op.get("dropped_duplicates", 0) for op in h.ops)
    print(f"\nCHAOS | {scenario} | 0 lost, 0 duplicated ({dropped} duplicate answers dropped) | {detail}")


def load_and_submit(c: NetnsCluster, h: History, tmp: Path) -> str:
    r = c.client("sdfs", "put", "-r", str(DATA), "in/")
    assert r.returncode == 0, r.stderr
    for i in range(3):
        local = tmp / f"doc{i}"
        local.write_bytes(os.urandom(200_000 + i))
        ok = c.client("sdfs", "put", str(local), f"docs/doc{i}").returncode == 0
        h.record("put", name=f"docs/doc{i}", local=str(local), readback=str(tmp / f"back{i}"), ok=ok)
    job = c.ctl("submit", "alexnet", "in/img_0[0-4]*", "--batch", "2", "--start")
    h.record("submit", job=job["job_id"], inputs=job["total"], ok=True)
    assert job["total"] == 50
    wait_for(lambda: c.ctl("completed")[job["job_id"]]["completed"] >= 6, timeout=90, interval=0.5,
             what="job under way", progress=lambda: c.ctl("completed")[job["job_id"]]["completed"])
    return job["job_id"]


def wait_done(c: NetnsCluster, job: str, timeout: float = 90) -> None:
    """Wait for ``job`` to finish; ``timeout`` is the longest wait with no new result (a loaded machine is slow)."""
    wait_for(lambda: c.ctl("completed", job)[job]["state"] == "done", timeout=timeout, interval=1.0,
             what=f"{job} to finish", progress=lambda: c.ctl("completed", job)[job]["completed"])


def busy_workers(c: NetnsCluster, n: int) -> list:
    info = c.ctl("vm_info")
    addr_of = {m["node_id"]: m["data_addr"] for m in c.alive_workers()}
    busy = {addr_of.get(node) for node, d in info.items() if d["tasks"]}
    nodes = [w for w in c.workers() if w.addr in busy]
    return (nodes + [w for w in c.workers() if w not in nodes])[:n]


def test_partitioned_worker_for_10s_then_healed(hosts):
    c, h, tmp = hosts
    job = load_and_submit(c, h, tmp)
    (victim,) = busy_workers(c, 1)
    c.net.partition(victim.host)
    h.record("partition", node=victim.addr)
    t0 = time.monotonic()
    wait_for(lambda: victim.addr not in c.alive_addrs(), timeout=10, interval=0.5,
             what="partitioned node declared failed")
    detected = time.monotonic() - t0
    time.sleep(max(0.0, 10 - detected))  # the nemesis holds the partition for 10 s
    c.net.heal(victim.host)
    h.record("heal", node=victim.addr)
    t_heal = time.monotonic()
    wait_for(lambda: victim.addr in c.alive_addrs(), timeout=20, interval=0.5,
             what="healed node rejoins (as a new incarnation)")
    rejoined = time.monotonic() - t_heal
    wait_done(c, job)
    assert check_history(h, c) == []
    report("partition one worker 10 s", h, detected=detected, rejoined_after_heal=rejoined)
    incarnations = [m for m in c.ctl("members")["members"] if m["data_addr"] == victim.addr]
    assert {m["state"] for m in incarnations} >= {"failed", "alive"}


def test_three_workers_killed_at_once(hosts):
    c, h, tmp = hosts
    job = load_and_submit(c, h, tmp)
    victims = busy_workers(c, 3)
    for v in victims:
        v.popen.send_signal(signal.SIGKILL)
    h.record("kill", nodes=[v.addr for v in victims])
    t0 = time.monotonic()
    wait_for(lambda: len(c.alive_workers()) == 5, timeout=10, interval=0.5, what="3 failures detected")
    detected = time.monotonic() - t0
    wait_for(lambda: c.ctl("info")["sdfs"]["under_replicated"] == 0, timeout=30, interval=0.5,
             what="re-replication to RF")
    at_rf = time.monotonic() - t0
    wait_done(c, job)
    assert check_history(h, c) == []
    report("SIGKILL 3 of 8 workers at once", h, detected=detected, back_at_rf=at_rf)


def test_primary_killed_while_a_worker_dies(hosts):
    c, h, tmp = hosts
    job = load_and_submit(c, h, tmp)
    primary = next(n for n in c.nodes if n.role == "coordinator")
    (worker,) = busy_workers(c, 1)
    primary.popen.send_signal(signal.SIGKILL)
    worker.popen.send_signal(signal.SIGKILL)
    h.record("kill", nodes=[primary.addr, worker.addr])
    t0 = time.monotonic()
    wait_for(lambda: c.ctl("members")["coordinator"]["role"] == "primary"
             and c.ctl("members")["coordinator"]["addr"] == c.standby, timeout=20, interval=0.5,
             what="standby promoted")
    promoted = time.monotonic() - t0
    wait_done(c, job)
    assert check_history(h, c) == []
    report("SIGKILL primary coordinator + a worker", h, standby_serving=promoted)


def test_gray_failure_sigstop_10s(hosts):
    c, h, tmp = hosts
    job = load_and_submit(c, h, tmp)
    (victim,) = busy_workers(c, 1)
    victim.popen.send_signal(signal.SIGSTOP)
    h.record("sigstop", node=victim.addr)
    time.sleep(10)  # the nemesis holds the process stopped for 10 s
    victim.popen.send_signal(signal.SIGCONT)
    h.record("sigcont", node=victim.addr)
    t0 = time.monotonic()
    wait_for(lambda: victim.addr in c.alive_addrs(), timeout=20, interval=0.5,
             what="stopped node back as a new incarnation")
    back = time.monotonic() - t0
    wait_done(c, job)
    assert check_history(h, c) == []
    report("SIGSTOP a worker 10 s, then SIGCONT", h, rejoined_after_sigcont=back)
