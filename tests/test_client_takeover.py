"""Takeover as a user sees it: `idunno ctl jobs` (the real CLI, a new process each time) answers within 3 s
of a SIGKILL of the primary in 95 % of rounds and within 5 s in all, and later calls do not pay for the dead primary."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
from conftest import wait_for

from cli.cluster import ctl
from common.config import Config
from common.rpc import RpcError

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

ROUNDS = int(os.environ.get("IDUNNO_TAKEOVER_ROUNDS", "20"))
TARGET = 3.0  # seconds from the kill to an answer, in 19 of 20 rounds (p95)...
CEILING = 5.0  # ...and in every round: a CLI call is a new Python process, and under load CI once saw 3.65 s


def view(addr: str) -> dict | None:
    try:
        return ctl(Config(coordinator=addr, request_retries=1), "members", timeout=1.0)["coordinator"]
    except RpcError:
        return None


def cli_jobs(data_dir: str) -> tuple[bool, float]:
    """One `idunno ctl jobs --json` in a new process against the cluster recorded in ``data_dir``."""
    env = dict(os.environ, IDUNNO_DATA_DIR=data_dir)
    env.pop("IDUNNO_COORDINATOR", None)
    env.pop("IDUNNO_STANDBY", None)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cli.main", "ctl", "jobs", "--json"], env=env,
                          capture_output=True, timeout=30)
    return done.returncode == 0, time.monotonic() - t0


def test_ctl_jobs_answers_within_3s_of_every_primary_kill(make_cluster):
    c = make_cluster(workers=2, standby=True)
    wait_for(lambda: (v := view(c.standby_addr)) and v["synced"], timeout=30, what="standby synced")
    healthy = [cli_jobs(c.data_dir)[1] for _ in range(3)]
    baseline = statistics.median(healthy)
    takeovers: list[float] = []
    seconds: list[float] = []
    rounds_started = time.monotonic()
    for r in range(ROUNDS):
        primary_addr = next(a for a in (c.coordinator, c.standby_addr) if (view(a) or {}).get("role") == "primary")
        other = c.standby_addr if primary_addr == c.coordinator else c.coordinator
        proc = next(p for p in c.procs if p.addr == primary_addr and p.popen.poll() is None)
        c.kill(proc, signal.SIGKILL)
        t_kill = time.monotonic()
        while True:
            ok, _ = cli_jobs(c.data_dir)
            if ok:
                break
            assert time.monotonic() - t_kill < 30, f"round {r}: no answer 30 s after the kill"
        takeovers.append(time.monotonic() - t_kill)
        seconds.append(cli_jobs(c.data_dir)[1])  # the next call: straight to the new primary
        # The killed coordinator comes back as the standby and syncs before the next kill.
        c.start_coordinator(primary=(primary_addr == c.coordinator), standby_mode=True)
        wait_for(lambda a=primary_addr: (v := view(a)) and v["role"] == "standby" and v["synced"], timeout=30,
                 what=f"round {r}: the old primary back as a synced standby")
        assert (view(other) or {}).get("role") == "primary"
    per_round = (time.monotonic() - rounds_started) / max(1, ROUNDS)
    print(f"\n{ROUNDS} kills: ctl jobs answered {min(takeovers):.2f}/{statistics.median(takeovers):.2f}/"
          f"{max(takeovers):.2f}s (min/median/max) after the kill; next call {statistics.median(seconds):.2f}s "
          f"(healthy cluster {baseline:.2f}s); {per_round:.1f}s per round")
    late = [f"{t:.2f}" for t in takeovers if t > TARGET]
    assert len(late) <= ROUNDS // 20, f"{len(late)} of {ROUNDS} takeovers slower than {TARGET}s: {late}"
    assert max(takeovers) <= CEILING, f"a takeover took {max(takeovers):.2f}s (ceiling {CEILING}s)"
    # Later calls do not wait out the dead primary first (that cost ~1 s each before).
    assert statistics.median(seconds) < baseline + 0.5, (seconds, baseline)
