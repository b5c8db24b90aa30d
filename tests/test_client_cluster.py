"""The Python client and the CLI built on it, against real local clusters."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import DATA, wait_for

from cli.cluster import free_port_block, load_state
from idunno import BadRequest, Client, NotFound, SdfsFailed, WaitTimeout

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
IMAGES = sorted(DATA.glob("*.jpg"))


def strict_json(text: str):
    def refuse(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def idunno(*args: str, data_dir: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("IDUNNO_COORDINATOR", None)
    if data_dir:
        env["IDUNNO_DATA_DIR"] = data_dir
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def test_the_docs_example_runs(make_cluster):
    c = make_cluster(workers=2)
    text = (REPO / "docs" / "client.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    env = dict(os.environ, PYTHONPATH=str(REPO), IDUNNO_DATA_DIR=c.data_dir)
    env.pop("IDUNNO_COORDINATOR", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 21  # one per image, then the summary
    assert {ln.split()[0] for ln in lines[:20]} == {f"demo/{p.name}" for p in IMAGES[:20]}
    assert re.match(r"job1-resnet18 done: 20 results, [\d.]+ images/s, \d+ duplicates dropped, p95 latency", lines[-1])


def test_client_jobs_results_wait_rate_cancel_and_sdfs(make_cluster, tmp_path):
    c = make_cluster(workers=2)
    with Client(coordinator=c.coordinator) as client:
        versions = client.sdfs.put_many([(str(p), f"in/{p.name}") for p in IMAGES[:30]])
        assert len(versions) == 30
        job = client.submit("noop", "in/", batch=3)
        assert job.total == 30
        seen = list(job.results(timeout=60))
        assert sorted(r.index for r in seen) == list(range(30))  # every result exactly once
        stamps = [r.completed_at for r in seen]
        assert stamps == sorted(stamps) and all(s is not None for s in stamps)
        # (A query goes out more than once only after a failure or a worker's re-attach.)
        assert all(r.label == "noop" and r.dispatches >= 1 and r.worker and r.latency >= 0 for r in seen)
        assert job.wait(timeout=5)["state"] == "done"
        rate = job.rate()
        assert rate["count"] == 30 and isinstance(rate["duplicates"], int)
        assert job.latency()["latency"]["count"] == 30
        # A queued job cancelled: nothing in flight, so it is finished at once; wait returns.
        queued = client.submit("noop", "in/", start=False)
        out = queued.cancel()
        assert out["state"] == "cancelled" and out["dropped"] == 30 and out["in_flight"] == 0
        assert queued.wait(timeout=5)["state"] == "cancelled"
        assert list(queued.results(timeout=5)) == []
        # Typed errors.
        with pytest.raises(NotFound, match="no such job"):
            client.job("job99-none")
        with pytest.raises(NotFound, match="no input files match"):
            client.submit("noop", "nothing/")
        with pytest.raises(BadRequest, match="batch size"):
            client.submit("noop", "in/", batch=100_000)
        with pytest.raises(WaitTimeout):
            client.submit("noop", "in/", start=False).wait(timeout=0.3)
        with pytest.raises(NotFound, match="--weights"):  # the pinned checkpoint reaches the coordinator
            client.submit("noop", "in/", weights="ckpts/missing.pth")
        # SDFS.
        local = tmp_path / "doc.txt"
        for i in range(3):
            local.write_text(f"version {i}")
            assert client.sdfs.put(local, "docs/doc.txt") == i + 1
        assert client.sdfs.read("docs/doc.txt") == b"version 2"
        client.sdfs.get("docs/doc.txt", tmp_path / "back.txt")
        assert (tmp_path / "back.txt").read_text() == "version 2"
        got = client.sdfs.get_versions("docs/doc.txt", 2, tmp_path / "versions.txt")
        assert [v["version"] for v in got] == [3, 2]
        assert [f["name"] for f in client.sdfs.ls("docs/")] == ["docs/doc.txt"]
        assert client.sdfs.delete("docs/doc.txt") == 3
        with pytest.raises(SdfsFailed):
            client.sdfs.get("docs/doc.txt", tmp_path / "gone.txt")


def test_cli_options_anywhere_wait_cancel_and_strict_json(make_cluster):
    c = make_cluster(workers=2)
    d = c.data_dir  # the CLI finds the cluster through IDUNNO_DATA_DIR/cluster.json
    r = idunno("sdfs", "put", "-r", str(DATA), "in/", data_dir=d)
    assert r.returncode == 0, r.stderr
    r = idunno("ctl", "submit", "noop", "in/img_0[0-3]*", "--batch", "2", "--json", data_dir=d)
    assert r.returncode == 0, r.stderr
    job = strict_json(r.stdout)["job_id"]
    # Queued, nothing done yet: latency statistics are null, not NaN.
    r = idunno("ctl", "query_time", job, "--json", data_dir=d)
    assert strict_json(r.stdout)[job]["latency"]["avg"] is None
    r = idunno("ctl", "start", data_dir=d)
    assert r.returncode == 0 and job in r.stdout
    r = idunno("ctl", "wait", job, "--timeout", "60", data_dir=d)
    assert r.returncode == 0 and f"{job} done: 40/40 results" in r.stdout, r.stdout + r.stderr
    # Global options after the command and its arguments; the coordinator given explicitly.
    r = idunno("ctl", "results", job, "--limit", "3", "--json", "--coordinator", c.coordinator, data_dir=d)
    rows = strict_json(r.stdout)["results"]
    assert len(rows) == 3 and all(row["completed_at"] and row["dispatches"] >= 1 for row in rows), rows
    r = idunno("--json", "ctl", "query_rate", job, data_dir=d)
    assert strict_json(r.stdout)["jobs"][job]["count"] == 40
    # Cancel a queued job; wait then returns at once with its state.
    r = idunno("ctl", "submit", "noop", "in/", "--json", data_dir=d)
    other = strict_json(r.stdout)["job_id"]
    r = idunno("ctl", "cancel", other, data_dir=d)
    assert r.returncode == 0 and f"{other} cancelled: 101 pending queries dropped" in r.stdout, r.stdout
    r = idunno("ctl", "wait", other, "--json", data_dir=d)
    assert strict_json(r.stdout)["state"] == "cancelled"
    # Waiting for a job that never starts times out with exit 1 and says so.
    r = idunno("ctl", "submit", "noop", "in/", "--json", data_dir=d)
    third = strict_json(r.stdout)["job_id"]
    r = idunno("ctl", "wait", third, "--timeout", "0.5", data_dir=d)
    assert r.returncode == 1 and f"{third} not finished after 0.5s" in r.stderr
    # An error names the command and the fix.
    r = idunno("ctl", "results", "job99", data_dir=d)
    assert r.returncode == 1 and "no such job 'job99'" in r.stderr


def test_results_iterator_survives_a_coordinator_failover_without_gap_or_repeat(make_cluster):
    c = make_cluster(workers=2, standby=True, env={"IDUNNO_PRELOAD_MODELS": "alexnet"})
    n = 60
    with Client(coordinator=f"{c.coordinator},{c.standby_addr}") as client:
        client.sdfs.put_many([(str(p), f"in/{p.name}") for p in IMAGES[:n]])
        job = client.submit("alexnet", "in/", batch=2)
        seen = []
        primary = next(p for p in c.procs if p.role == "coordinator")
        for r in job.results(timeout=120):
            seen.append(r)
            if len(seen) == 5:
                c.kill(primary, signal.SIGKILL)
        assert sorted(r.index for r in seen) == list(range(n))
        assert client.command("members")["coordinator"]["addr"] == c.standby_addr
        assert job.rate()["count"] == n


def test_up_preloads_models_and_serves_metrics_then_down_by_data_dir(tmp_path):
    d = str(tmp_path / "var")
    port = free_port_block(size=1)
    try:
        r = idunno("up", "--workers", "1", "--no-standby", "--preload", "noop", "--metrics-port", str(port),
                   "--detach", "--data-dir", d)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "preloading noop" in r.stdout and f":{port}/metrics" in r.stdout
        with Client(data_dir=d) as client:
            # The worker loaded the model at start, before any job asked for it.
            wait_for(lambda: any("noop" in w["models"] for w in client.command("vm_info").values()), timeout=30,
                     what="noop preloaded")
            client.sdfs.put_many([(str(p), f"in/{p.name}") for p in IMAGES[:4]])
            job = client.submit("noop", "in/")
            job.wait(timeout=60)

            def scrape() -> str:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

            wait_for(lambda: f'idunno_queries_completed_total{{job="{job.id}",model="noop"}} 4.0' in scrape(),
                     timeout=10, what="metrics of the job")
            assert f'idunno_duplicate_results_total{{job="{job.id}",model="noop"}} ' in scrape()
    finally:
        r = idunno("down", data_dir=d)  # IDUNNO_DATA_DIR, no --data-dir
    assert r.returncode == 0 and "stopped 2 processes" in r.stdout, r.stdout + r.stderr
    assert load_state(d) is None
