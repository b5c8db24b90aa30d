"""Durable coordinator state on real processes: both coordinators SIGKILLed mid-job, the whole
cluster stopped and started again, and the results file of every finished job after failover."""

from __future__ import annotations

import json
import signal
from collections import Counter

import pytest
from chaos.checks import exactly_once
from conftest import wait_for
from test_failover import coordinator_view, roles

from common.rpc import RpcError
from sdfs.client import SdfsClient

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

NOOP = {"IDUNNO_PRELOAD_MODELS": "noop"}


def load_inputs(c, tmp_path, n: int, prefix: str = "in/") -> list[str]:
    src = tmp_path / "inputs"
    src.mkdir(exist_ok=True)
    names = []
    for i in range(n):
        p = src / f"f{i:03d}"
        p.write_bytes(b"x%d" % i)  # noop does not decode its inputs: any bytes do
        names.append((str(p), f"{prefix}f{i:03d}"))
    with SdfsClient(c.config()) as client:
        client.put_many(names)
    return [n for _, n in names]


def jobs(c) -> dict[str, dict]:
    try:
        return {j["job_id"]: j for j in c.ctl("jobs", timeout=2.0)}
    except RpcError:
        return {}


def wait_done(c, job_ids, timeout=30):
    wait_for(lambda: all(jobs(c).get(j, {}).get("state") == "done" for j in job_ids), timeout=timeout,
             interval=0.1, what=f"{job_ids} done",
             progress=lambda: sum(j["completed"] for j in jobs(c).values()))


def check_results(c, job_id: str, inputs: list[str]) -> None:
    res = c.ctl("results", job=job_id)["results"]
    per_input = Counter(r["input"] for r in res)
    assert sorted(per_input) == sorted(inputs) and set(per_input.values()) == {1}, job_id
    check = exactly_once(job_id, res, len(inputs))  # the coordinator's own per-query counts
    assert check.ok, check.problems


def check_results_file(c, tmp_path, job_id: str, n: int, timeout: float = 20) -> None:
    """``results/<job>`` is in SDFS with one entry per input, and recorded as written."""
    wait_for(lambda: (jobs(c).get(job_id) or {}).get("results_version"), timeout=timeout,
             what=f"results of {job_id} recorded as written")
    with SdfsClient(c.config()) as client:
        client.get(f"results/{job_id}", tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["job"] == job_id and len({r["qid"] for r in doc["results"]}) == len(doc["results"]) == n


def coordinators(c):
    return [p for p in c.procs if p.role in ("coordinator", "standby") and p.popen.poll() is None]


def terms(c) -> list[int]:
    return [v["term"] for a in (c.coordinator, c.standby_addr) if (v := coordinator_view(a))]


def test_sigkill_both_coordinators_mid_job_resumes_exactly_once_and_counts_on(make_cluster, tmp_path):
    c = make_cluster(workers=3, standby=True, env=NOOP)
    wait_for(lambda: roles(c)[c.standby_addr] == ("standby", 1), timeout=15, what="standby ready")
    inputs = load_inputs(c, tmp_path, 240)
    small = [n for n in inputs if n < "in/f040"]
    a = c.ctl("submit", model="noop", inputs="in/f0[0-3]*", batch=4, start=True)["job_id"]
    wait_done(c, [a])
    # Two workers frozen: the tasks they are given stay in flight while the third worker answers
    # the rest, so the coordinators die with a job part done and part out at workers.
    workers = c.worker_procs()
    for w in workers[:2]:
        w.popen.send_signal(signal.SIGSTOP)
    try:
        b = c.ctl("submit", model="noop", inputs="in/", batch=2, start=True)["job_id"]

        def stuck():
            p = c.ctl("pending", job=b)[b]
            return p["pending_count"] == 0 and p["in_flight"] > 0 and jobs(c)[b]["completed"] + p["in_flight"] == 240

        wait_for(stuck, timeout=20, interval=0.05, what="job b answered but for the frozen workers' tasks")
        workers[2].popen.send_signal(signal.SIGSTOP)
        seen = c.ctl("query_rate", job=b)["jobs"][b]["count"]
        used = max(terms(c))
        assert 0 < seen < len(inputs)
        for p in coordinators(c):
            c.kill(p, signal.SIGKILL)
        c.start_coordinator(primary=True)
        c.start_coordinator(primary=False)
    finally:
        for w in c.worker_procs():
            w.popen.send_signal(signal.SIGCONT)
    wait_for(lambda: (coordinator_view(c.coordinator) or {}).get("role") == "primary", timeout=20,
             what="restarted primary")
    # The new primary's term was never used before the kill (a standby only follows a term).
    assert coordinator_view(c.coordinator)["term"] > used
    counts = [c.ctl("query_rate", job=b)["jobs"][b]["count"]]
    assert counts[0] >= seen  # what a client was told survived both coordinators

    def b_done():
        counts.append(c.ctl("query_rate", job=b)["jobs"][b]["count"])
        return jobs(c)[b]["state"] == "done"

    wait_for(b_done, timeout=30, interval=0.1, what="job b to resume and finish", progress=lambda: counts[-1])
    assert counts == sorted(counts), "the completed count went backwards"
    assert jobs(c)[a]["state"] == "done"
    check_results(c, a, small)
    check_results(c, b, inputs)
    assert c.ctl("query_time", job=b)[b]["latency"]["count"] == len(inputs)
    check_results_file(c, tmp_path, a, len(small))
    check_results_file(c, tmp_path, b, len(inputs))
    wait_for(lambda: roles(c)[c.standby_addr] == ("standby", coordinator_view(c.coordinator)["term"]),
             timeout=20, what="standby synced to the restarted primary")


def test_whole_cluster_down_and_up_keeps_finished_jobs_and_their_results(make_cluster, tmp_path):
    c = make_cluster(workers=3, standby=True, env=NOOP)
    inputs = load_inputs(c, tmp_path, 60)
    a = c.ctl("submit", model="noop", inputs="in/", batch=4, start=True)["job_id"]
    wait_done(c, [a])
    check_results_file(c, tmp_path, a, len(inputs))
    before = jobs(c)[a]
    used = max(terms(c))
    workers = [(int(p.addr.rsplit(":", 1)[1]), p.data_dir) for p in c.worker_procs()]
    c.stop()  # SIGTERM to every process, as `idunno down`
    c.procs = []
    c.start_coordinator(primary=True)
    c.start_coordinator(primary=False)
    for port, d in workers:  # the same nodes (address, data and replicas) again
        c.add_worker(port=port, data_dir=d)
    c.wait_ready(len(workers), timeout=30)
    wait_for(lambda: jobs(c).get(a), timeout=20, what="jobs after restart")
    after = jobs(c)[a]
    assert after["state"] == "done" and after["completed"] == before["completed"] == len(inputs)
    assert after["results_version"] == before["results_version"]  # written once, not again
    assert coordinator_view(c.coordinator)["term"] > used
    check_results(c, a, inputs)
    check_results_file(c, tmp_path, a, len(inputs))
    assert c.ctl("query_rate", job=a)["jobs"][a]["count"] == len(inputs)


def test_results_file_of_every_finished_job_after_failover(make_cluster, tmp_path):
    c = make_cluster(workers=3, standby=True, env=NOOP)
    wait_for(lambda: roles(c)[c.standby_addr] == ("standby", 1), timeout=15, what="standby ready")
    inputs = load_inputs(c, tmp_path, 40)
    ids = [c.ctl("submit", model="noop", inputs=f"in/f0{d}*", batch=2, start=True)["job_id"] for d in range(4)]
    wait_done(c, ids)
    primary = next(p for p in c.procs if p.role == "coordinator")
    c.kill(primary, signal.SIGKILL)  # right after the jobs finished: the writer may not have written yet
    wait_for(lambda: (coordinator_view(c.standby_addr) or {}).get("role") == "primary", timeout=15,
             what="promotion")
    for d, job in enumerate(ids):
        check_results_file(c, tmp_path, job, len([n for n in inputs if n.startswith(f"in/f0{d}")]))
