"""A hot standby syncs a state far above one frame (>= 50 MB) and takes over with it, losing nothing.

The bulk of the state is SDFS metadata seeded into the primary's metadata database before it starts
(100,000 files: putting them for real would take minutes), plus 50 finished noop jobs run for real.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import DATA, wait_for

from cli.cluster import COORD_SLOTS, LocalCluster, ctl, free_port_block
from common.config import Config
from common.rpc import RpcError
from sdfs.client import SdfsClient

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

FILES = 100_000
JOBS = 50


def seed_metadata(db: Path, n: int) -> None:
    """Test-only: n SDFS files of three versions each, straight into the master's table (its schema)."""
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, entry TEXT NOT NULL)")
    # Nodes long gone (ids of the usual form): nothing to repair from, and no node reports them.
    holders = [f"127.0.0.1:{p}@1795967552{p}" for p in (30001, 30002, 30003)]
    rows = []
    for i in range(n):
        versions = [{"version": v, "size": 1000 + i, "checksum": f"{i:032x}{v:032x}", "mtime": 1.7e9 + i,
                     "holders": holders} for v in (1, 2, 3)]
        rows.append((f"bulk/run-{i % 97:03d}/camera-{i % 13:02d}/frame-{i:07d}.jpg",
                     json.dumps({"next_version": 4, "versions": versions})))
    with conn:
        conn.executemany("INSERT INTO files (name, entry) VALUES (?, ?)", rows)
    conn.close()


def view(addr: str) -> dict | None:
    try:
        return ctl(Config(coordinator=addr, request_retries=1), "members", timeout=2.0)["coordinator"]
    except RpcError:
        return None


def memory_mb(pid: int, key: str) -> float:
    """VmRSS / VmHWM (peak) of a process, in MB (for the report: the memory ceiling of a transfer)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synced_line(log_path: str) -> re.Match | None:
    text = Path(log_path).read_text(errors="replace")
    found = re.findall(r"standby synced: state seq (\d+) \(now (\d+)\).*?; ([\d.]+) MB in (\d+) chunks in ([\d.]+)s",
                       text)
    return found[-1] if found else None


@pytest.fixture
def big_cluster(tmp_path):
    # Every seeded file has only long-gone holders: repair could do nothing for them but would still
    # look at each (5,000 per pass after a start from disk), so it runs rarely: this test is about sync.
    c = LocalCluster(workers=3, standby=True, data_dir=str(tmp_path / "c"), torch_threads=1,
                     env={"IDUNNO_REPAIR_INTERVAL": "60"})
    c.coordinator = f"{c.host}:{free_port_block(c.host)}"
    c.standby_addr = f"{c.host}:{free_port_block(c.host)}"
    seed_metadata(Path(c.data_dir) / COORD_SLOTS[0] / "metadata.sqlite", FILES)  # the primary slot's directory
    try:
        c.start_coordinator(primary=True)
        c.start_coordinator(primary=False)
        for _ in range(3):
            c.add_worker()
        c.save()
        c.wait_ready(3, timeout=90)
        yield c
    finally:
        c.stop()
        assert not [p for p in c.procs if p.popen.poll() is None]


def fill_with_jobs(c: LocalCluster, images: list[Path]) -> tuple[int, int]:
    """JOBS noop jobs over ``images``, all done and their results files written: (jobs, SDFS files)."""
    with SdfsClient(c.config()) as client:
        client.put_many([(str(p), f"real/{p.name}") for p in images])
    for _ in range(JOBS):  # (a submit retried after a slow reply may add a job: at least JOBS, all done)
        c.ctl("submit", model="noop", inputs="real/", batch=4, start=True, timeout=10.0)
    wait_for(lambda: (s := [j["state"] for j in c.ctl("jobs", timeout=5.0)]) and len(s) >= JOBS
             and set(s) == {"done"}, timeout=120, what="50 noop jobs done")
    # Every finished job's results file is written (asynchronously) before the state is compared. The
    # count is taken now: `info` walks every file (O(files) on the primary's loop, see sdfs/master.py),
    # and a stall just before the kill would only lengthen the standby's adaptive detection.
    n_jobs = len(c.ctl("jobs", timeout=10.0))
    files = wait_for(lambda: (n := c.ctl("info", timeout=10.0)["sdfs"]["files"]) == FILES + len(images) + n_jobs
                     and n, timeout=60, what="every results file written")
    return n_jobs, files


def restart_standby_until_synced(c: LocalCluster) -> float:
    """SIGKILL the standby and start it again: it pulls the whole state, chunk by chunk, while the
    primary serves. Returns the megabytes transferred (from the standby's log)."""
    standby = next(p for p in c.procs if p.addr == c.standby_addr and p.popen.poll() is None)
    c.kill(standby, signal.SIGKILL)
    primary_pid = next(p for p in c.procs if p.addr == c.coordinator).popen.pid
    primary_rss = memory_mb(primary_pid, "VmRSS")
    t0 = time.monotonic()
    restarted = c.start_coordinator(primary=False)
    primary_seq = view(c.coordinator)["state_seq"]
    wait_for(lambda: (v := view(c.standby_addr)) and v["synced"] and v["state_seq"] >= primary_seq, timeout=90,
             what="standby synced")
    took = time.monotonic() - t0
    line = synced_line(next(p.log_path for p in c.procs if p.addr == c.standby_addr and p.popen.poll() is None))
    assert line is not None
    print(f"\nstandby restart -> synced in {took:.1f}s: {float(line[2]):.1f} MB in {line[3]} chunks, "
          f"transfer {line[4]}s; primary RSS {primary_rss:.0f} MB before, {memory_mb(primary_pid, 'VmRSS'):.0f} MB "
          f"after (peak {memory_mb(primary_pid, 'VmHWM'):.0f}); standby peak "
          f"{memory_mb(restarted.popen.pid, 'VmHWM'):.0f} MB, now {memory_mb(restarted.popen.pid, 'VmRSS'):.0f} MB")
    return float(line[2])


def kill_primary_until_standby_answers(c: LocalCluster) -> tuple[Config, list[dict], float]:
    """SIGKILL the primary; poll the standby's `jobs` until it answers as primary:
    (a config for the new primary, its `jobs` answer, seconds from the kill to that answer)."""
    primary = next(p for p in c.procs if p.addr == c.coordinator)
    c.kill(primary, signal.SIGKILL)
    t_kill = time.monotonic()
    standby_cfg = Config(coordinator=c.standby_addr, request_retries=1)

    def answered():
        try:
            return ctl(standby_cfg, "jobs", timeout=0.5)
        except RpcError:
            return None

    jobs = wait_for(answered, timeout=30, interval=0.02, what="the standby to answer as primary")
    return standby_cfg, jobs, time.monotonic() - t_kill


def test_standby_syncs_50mb_state_and_takes_over_within_3s_losing_nothing(big_cluster, tmp_path):
    c = big_cluster
    images = sorted(DATA.glob("*.jpg"))[:8]
    n_jobs, before_files = fill_with_jobs(c, images)
    megabytes = restart_standby_until_synced(c)
    assert megabytes >= 50, f"state of only {megabytes} MB"
    assert view(c.standby_addr)["state_seq"] == view(c.coordinator)["state_seq"]

    before_jobs = c.ctl("jobs")
    assert len(before_jobs) == n_jobs
    workers = {m["node_id"] for m in c.alive_workers()}
    standby_cfg, after_jobs, takeover = kill_primary_until_standby_answers(c)
    print(f"kill -> new primary answers `jobs`: {takeover:.2f}s")
    assert takeover <= 3.0
    assert after_jobs == before_jobs
    info = ctl(standby_cfg, "info")
    assert info["sdfs"]["files"] == before_files
    # The workers re-attach and keep working; none is blamed for the takeover.
    job = ctl(standby_cfg, "submit", model="noop", inputs="real/", batch=2, start=True)["job_id"]
    wait_for(lambda: ctl(standby_cfg, "completed", job=job)[job]["completed"] == len(images), timeout=30,
             what="a job after the takeover")
    info = ctl(standby_cfg, "info")
    members = ctl(standby_cfg, "members")["members"]
    assert info["failures_detected"] == 0, members
    assert {m["node_id"] for m in members if m["state"] == "alive" and m["role"] == "worker"} == workers
    print(f"new primary: loop stall max {info['loop_stall_max']}s, slowest message {info['slowest_message']}")
