"""Scale: the coordinator with 1,000 simulated workers in virtual time, and the torch-free worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_for
from simcluster import SimCluster

from broker.stats import rate_gap
from common.config import Config
from sdfs.client import SdfsClient

ROOT = Path(__file__).resolve().parent.parent

WORKERS = 1000
JOBS = 10
INPUTS = 3000


def lose_and_duplicate_nothing(workers: int, inputs: int) -> float:
    """Ten jobs on ``workers`` simulated workers, a tenth of them killed while holding work; every
    input answered exactly once. Returns the CPU seconds it took."""
    started = time.process_time()
    cfg = Config(heartbeat_interval=0.5, liveness=3, task_timeout_min=1e6, stream_interval=0.0)
    costs = {f"m{i}": 0.5 for i in range(JOBS)}  # seconds per image
    sim = SimCluster(costs, speeds=[1.0] * workers, cfg=cfg)
    # Each input on four workers (the replication factor) that are never killed: the master has no
    # repair to do, and the test is about scheduling.
    keepers = list(sim.workers)[:4]
    for node in keepers:
        sim.core.master.node_report(node, [[f"in/img{i:05d}.jpg", 1, 100, "c" * 64] for i in range(inputs)])
    jobs = [sim.command("submit", model=m, inputs="in/", batch=8)["job_id"] for m in costs]
    sim.command("start")
    sim.run_until(10.0)
    # Every worker got work (none idles while ten jobs have a backlog).
    assert {w for _, _, w, _ in sim.dispatches} == set(sim.workers)
    # Equal shares of the workers among 10 equal jobs (a job served first or last by the pass order
    # would show here): each job's completions so far (batches of 8 finish in waves, so a short
    # window's rate is lumpy; test_coordinator.py checks windows and unequal models).
    gap = rate_gap([len(sim.core.jobs.jobs[j].results) for j in jobs])
    assert gap <= 0.10, f"rate gap among {JOBS} jobs {gap:.1%}"
    # Kill a tenth of the workers, ones that hold work (not the input holders).
    victims = [w for w in sim.workers if w not in keepers and sim.core.jobs.tasks_of(w)][: workers // 10]
    assert len(victims) == workers // 10
    held = [(t.job_id, i) for w in victims for t in sim.core.jobs.tasks_of(w) for i in t.indexes]
    for w in victims:
        sim.kill(w)
    sim.run_until(14.0)
    assert all(not sim.core.registry.is_alive(w) for w in victims)
    assert not any(sim.core.jobs.tasks_of(w) for w in victims)  # their tasks were taken back...
    sim.run_until(30.0)
    for j in jobs:  # ...and every input of every job answered exactly once
        job = sim.core.jobs.jobs[j]
        assert job.state == "done", (j, job.state, len(job.results))
        assert sorted(job.results) == list(range(inputs))
    assert held, "the victims held tasks when they died"
    assert all(sim.core.jobs.jobs[j].results[i]["worker"] not in victims for j, i in held)
    return time.process_time() - started


def test_a_thousand_workers_ten_jobs_and_a_hundred_failures_lose_and_duplicate_nothing():
    # Correctness at scale only: bench/sim_scale.py reports what this scenario costs as the cluster
    # grows (against its smallest size in the same run). A CPU budget here failed for the machine,
    # not the code: CI under a hog measured 103 s of CPU for what takes 30 s quiet.
    cpu = lose_and_duplicate_nothing(WORKERS, INPUTS)
    print(f"\n{WORKERS} simulated workers: {cpu:.1f} s of CPU")


@pytest.mark.slow
def test_a_torch_free_worker_serves_noop_without_torch_and_refuses_real_models_per_query(make_cluster, tmp_path):
    c = make_cluster(workers=2, env={"IDUNNO_TORCH": "0"})
    inputs = []
    for i in range(12):
        p = tmp_path / f"x{i}.bin"
        p.write_bytes(b"not an image %d" % i)  # noop takes any bytes
        inputs.append((str(p), f"in/x{i}.bin"))
    with SdfsClient(c.config()) as client:
        client.put_many(inputs)
    noop = c.ctl("submit", model="noop", inputs="in/", batch=4, start=True)["job_id"]
    alexnet = c.ctl("submit", model="alexnet", inputs="in/", batch=4, start=True)["job_id"]  # noop may be done

    def done() -> bool:
        return all(j["state"] == "done" for j in c.ctl("jobs") if j["job_id"] in (noop, alexnet))

    wait_for(done, timeout=60, interval=0.2, what="both jobs to finish")
    ok = c.ctl("results", job=noop)["results"]
    assert len(ok) == 12 and all(r["error"] is None and r["top5"] == [["noop", 1.0]] for r in ok)
    refused = c.ctl("results", job=alexnet)["results"]
    assert len(refused) == 12
    assert all(not r["top5"] and "runs without torch" in r["error"] for r in refused), refused[:2]
    # Neither worker process ever mapped libtorch (nor loaded the torch package).
    for proc in c.worker_procs():
        maps = Path(f"/proc/{proc.popen.pid}/maps").read_text()
        assert "libtorch" not in maps and "/torch/" not in maps, proc.name


def test_the_worker_start_path_imports_no_torch_when_told_not_to(tmp_path):
    """In-process check of the same rule, down to sys.modules, in a fresh interpreter."""
    script = f"""
import sys
from pathlib import Path
from common.config import load_config
from worker.worker import Worker
cfg = load_config(env={{"IDUNNO_TORCH": "0", "IDUNNO_COORDINATOR": "127.0.0.1:9"}})
w = Worker(cfg, Path({str(tmp_path / "w")!r}), port=0, name="w0")
w.start()
from common.protocol import Task
from worker.executor import Prepared
task = Task("t1.1-j", "j", "noop", 1, [{{"index": i, "input": "in", "version": 1}} for i in range(2)])
out = [r[1] for piece in w.executor._run(Prepared(task, 0, [b"x", b"y"], [None, None])) for r in piece.results]
w.shutdown(leave=False)
print("torch" in sys.modules, "torchvision" in sys.modules, "models" in sys.modules, out)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:3] == ["False", "False", "False"], res.stdout
    assert "noop" in res.stdout
