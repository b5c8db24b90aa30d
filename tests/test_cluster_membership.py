"""Membership and failure detection with real processes on loopback."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for

from cli.cluster import free_port_block
from cli.logs import stream_logs
from common.identity import split_node_id

pytestmark = pytest.mark.slow


def states(cluster) -> dict[str, str]:
    return {m["node_id"]: m["state"] for m in cluster.members()}


def node_of(cluster, proc) -> str:
    return next(m["node_id"] for m in cluster.members() if m["data_addr"] == proc.addr and m["state"] == "alive")


def test_join_fail_detection_within_3s_and_leave(make_cluster):
    c = make_cluster(workers=4)
    assert len(c.alive_workers()) == 4
    victim = c.worker_procs()[0]
    node = node_of(c, victim)
    t0 = time.monotonic()
    c.kill(victim, signal.SIGKILL)
    wait_for(lambda: states(c)[node] == "failed", timeout=5, what="failure detection")
    detection = time.monotonic() - t0
    assert detection <= 3.0, f"detected after {detection:.2f}s"
    # A voluntary leave is not a failure.
    leaver = c.worker_procs()[0]
    leaving = node_of(c, leaver)
    c.kill(leaver, signal.SIGTERM)
    wait_for(lambda: states(c)[leaving] == "left", timeout=5, what="leave event")


def test_restarted_node_is_a_new_incarnation(make_cluster):
    c = make_cluster(workers=2)
    proc = c.worker_procs()[0]
    old = node_of(c, proc)
    c.kill(proc, signal.SIGKILL)
    wait_for(lambda: states(c)[old] == "failed", timeout=5, what="failure")
    # Same address, new process.
    port = proc.addr.rsplit(":", 1)[1]
    new_proc = c._spawn("worker", ["worker", "--name", proc.name, "--port", port, "--data-dir",
                                   str(Path(c.data_dir) / "w-again")], "w-again")
    new_proc.addr = proc.addr
    new = wait_for(lambda: next((m["node_id"] for m in c.members() if m["data_addr"] == proc.addr
                                 and m["state"] == "alive"), None), timeout=20, what="rejoin")
    assert new != old
    assert split_node_id(new)[0] == split_node_id(old)[0]
    assert split_node_id(new)[1] > split_node_id(old)[1]
    assert states(c)[old] == "failed"


def test_sigstopped_node_is_failed_then_rejoins_as_new_incarnation(make_cluster):
    c = make_cluster(workers=2)
    proc = c.worker_procs()[0]
    old = node_of(c, proc)
    proc.popen.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: states(c)[old] == "failed", timeout=5, what="failure of a stopped node")
    finally:
        proc.popen.send_signal(signal.SIGCONT)
    new = wait_for(lambda: next((m["node_id"] for m in c.members() if m["data_addr"] == proc.addr
                                 and m["state"] == "alive"), None), timeout=10, what="rejoin after SIGCONT")
    assert new != old and split_node_id(new)[1] > split_node_id(old)[1]
    assert states(c)[old] == "failed"  # not resurrected silently


def _burn(stop_at: float) -> None:
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while time.time() < stop_at:
        a = (a @ a).tanh()


def test_no_false_positive_with_every_core_busy(make_cluster):
    c = make_cluster(workers=4)
    c.ctl("members")
    before = states(c)
    stop_at = time.time() + 30
    ctx = multiprocessing.get_context("spawn")
    burners = [ctx.Process(target=_burn, args=(stop_at,)) for _ in range(os.cpu_count() or 2)]
    for b in burners:
        b.start()
    try:
        while time.time() < stop_at:
            now = states(c)
            assert now == before, f"false positive: {now}"
            time.sleep(0.5)  # sampling the view during the run
    finally:
        for b in burners:
            b.join(timeout=40)
            if b.is_alive():
                b.kill()
    assert states(c) == before


def test_log_stream_includes_nodes_that_join_later(make_cluster):
    c = make_cluster(workers=1)
    port = free_port_block("127.0.0.1", 1)
    out = io.StringIO()
    t = threading.Thread(target=stream_logs, args=(c.config(),),
                         kwargs={"out": out, "duration": 30, "count": 1, "node": "late-node",
                                 "grep": "joined coordinator"})
    t.start()
    time.sleep(0.5)  # the subscription must reach the coordinators before the new node starts
    c.add_worker(port, name="late-node")
    t.join()
    line = out.getvalue().strip()
    assert "late-node" in line, out.getvalue()
    assert "INFO" in line and "joined coordinator" in line  # time stamp, node name, level, message


def test_cli_up_members_down_leaves_no_process(tmp_path):
    env = dict(os.environ)
    env.pop("IDUNNO_COORDINATOR", None)
    run = [sys.executable, "-m", "cli.main"]
    d = ["--data-dir", str(tmp_path / "var")]
    up = subprocess.run([*run, "up", "--workers", "4", "--detach", *d], capture_output=True, text=True, env=env,
                        timeout=90)
    assert up.returncode == 0, up.stderr
    try:
        members = subprocess.run([*run, "members", *d], capture_output=True, text=True, env=env, timeout=30)
        assert members.returncode == 0
        assert members.stdout.count(" alive ") == 4
        state = (tmp_path / "var" / "cluster.json").read_text()
        assert state.count('"pid"') == 6  # coordinator, standby, 4 workers
    finally:
        down = subprocess.run([*run, "down", *d], capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 0
    import json  # noqa: PLC0415

    pids = [p["pid"] for p in json.loads(state)["procs"]]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


def test_cli_rejects_unknown_commands_and_flags(tmp_path):
    run = [sys.executable, "-m", "cli.main"]
    r = subprocess.run([*run, "frobnicate"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = subprocess.run([*run, "up", "--wrkers", "3"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
    r = subprocess.run([*run, "ctl", "--data-dir", str(tmp_path), "nonsense"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "unknown command" in r.stderr
