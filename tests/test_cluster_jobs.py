"""Inference jobs end to end on a real local cluster (real torchvision models, seeded weights)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from chaos.checks import exactly_once
from conftest import DATA, wait_for
from rich.console import Console

from cli.cluster import free_port_block
from cli.report import build_figure, write_report
from cli.shell import CommandCompleter, run_coordinator_line
from common.commands import COMMANDS
from common.rpc import RpcError
from sdfs.client import SdfsClient

pytestmark = pytest.mark.slow

IMAGES = sorted(DATA.glob("*.jpg"))


def load(cluster, n: int, prefix: str = "in/") -> None:
    with SdfsClient(cluster.config()) as client:
        client.put_many([(str(p), f"{prefix}{p.name}") for p in IMAGES[:n]])


def wait_done(cluster, jobs: list[str], timeout: float = 60) -> None:
    """Wait for ``jobs`` to finish; ``timeout`` is the longest wait with no new result."""
    def done() -> bool:
        states = {j["job_id"]: j["state"] for j in cluster.ctl("jobs")}
        return all(states[j] == "done" for j in jobs)

    def completed() -> int:
        return sum(j["completed"] for j in cluster.ctl("jobs") if j["job_id"] in jobs)

    wait_for(done, timeout=timeout, interval=0.2, what=f"jobs {jobs} to finish", progress=completed)


def check_exactly_once(cluster, job: str, n: int) -> list[dict]:
    res = cluster.ctl("results", job=job)["results"]
    check = exactly_once(job, res, n)  # every query accepted exactly once, by the coordinator's count
    assert check.ok, check.problems
    assert sorted(r["input"] for r in res) == sorted(f"in/{p.name}" for p in IMAGES[:n])
    return res


def test_two_jobs_with_a_worker_killed_mid_job_lose_and_duplicate_nothing(make_cluster, tmp_path):
    c = make_cluster(workers=4, env={"IDUNNO_PRELOAD_MODELS": "alexnet,resnet18"})
    n = 40
    load(c, n)
    a = c.ctl("submit", model="alexnet", inputs="in/", batch=2, start=True)["job_id"]
    b = c.ctl("submit", model="resnet18", inputs="in/", batch=2)["job_id"]
    # Kill a worker while it holds work.

    def busy_worker():
        info = c.ctl("vm_info")
        return next((node for node, d in info.items() if d["tasks"]), None)

    node = wait_for(busy_worker, timeout=60, what="a worker with tasks")
    proc = next(p for p in c.worker_procs() if node.startswith(p.name + "@"))
    c.kill(proc, signal.SIGKILL)
    wait_done(c, [a, b])
    for job in (a, b):
        res = check_exactly_once(c, job, n)
        assert all(r["error"] is None and len(r["top5"]) == 5 for r in res)
    # Results were written to SDFS as well.
    with SdfsClient(c.config()) as client:
        wait_for(lambda: client.ls(f"results/{a}"), timeout=20, what="results file in SDFS")
        client.get(f"results/{a}", tmp_path / "r.json")
    import json  # noqa: PLC0415

    doc = json.loads((tmp_path / "r.json").read_text())
    assert len(doc["results"]) == n and doc["job"] == a and doc["model"] == "alexnet"
    # Statistics are consistent with the results.
    rate = c.ctl("query_rate", job=a)["jobs"][a]
    assert rate["count"] == n
    t = c.ctl("query_time", job=b)[b]["latency"]
    assert t["count"] == n and t["avg"] > 0 and t["median"] <= t["p99"]


def test_set_batch_size_changes_what_workers_receive(make_cluster):
    # Two tasks a worker at most, pinned: the default depth (8) lets a worker take a third task of a
    # model this cheap (6 images of about 6.5 ms) while its held tasks' unanswered compute is under
    # cheap_queue_seconds, and the test needs tasks left to dispatch after the change.
    c = make_cluster(workers=2, env={"IDUNNO_PRELOAD_MODELS": "mobilenet_v3_small", "IDUNNO_WORKER_CREDIT": "2"})
    n = 60
    load(c, n)
    job = c.ctl("submit", model="mobilenet_v3_small", inputs="in/", batch=6, start=True)["job_id"]
    wait_for(lambda: c.ctl("completed", job=job)[job]["completed"] >= 12, timeout=90, what="first batches")
    c.ctl("set_batch_size", job=job, n=2)
    wait_done(c, [job])
    res = check_exactly_once(c, job, n)
    sizes = [r["batch"] for r in sorted(res, key=lambda r: int(r["qid"].split(":")[1]))]
    assert sizes[0] == 1 and max(sizes) == 6  # slow start (1, 1, 2, 4, ...), then the batch size
    assert sizes[-1] <= 2  # the tail was dispatched after the change


def test_corrupt_inputs_yield_error_results_and_empty_jobs_are_refused(make_cluster, tmp_path):
    c = make_cluster(workers=2, env={"IDUNNO_PRELOAD_MODELS": "mobilenet_v3_small"})
    load(c, 4)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with SdfsClient(c.config()) as client:
        client.put(junk, "in/zz_junk.jpg")
        client.put(text, "in/zz_text.jpg")
    job = c.ctl("submit", model="mobilenet_v3_small", inputs="in/", batch=3, start=True)["job_id"]
    wait_done(c, [job])
    res = {r["input"]: r for r in c.ctl("results", job=job)["results"]}
    assert len(res) == 6
    assert res["in/zz_junk.jpg"]["error"] and res["in/zz_text.jpg"]["error"]
    assert all(res[f"in/{p.name}"]["error"] is None for p in IMAGES[:4])
    assert c.ctl("completed", job=job)[job]["errors"] == 2
    # A job over nothing, and an unknown model, give clear errors.
    with pytest.raises(RpcError, match="no input files match"):
        c.ctl("submit", model="alexnet", inputs="empty/")
    with pytest.raises(RpcError, match="unknown model 'no_such_net'"):  # refused at submit, not per query
        c.ctl("submit", model="no_such_net", inputs="in/img_000", start=True)
    env = dict(os.environ, **c.client_env())
    cli = [sys.executable, "-m", "cli.main", "ctl"]
    for args, msg, code in [
        (["submit", "alexnet", "missing/*"], "no input files match", 1),
        (["submit", "alexnet"], "missing inputs", 2),
        (["submit", "alexnet", "in/", "--batch", "100000"], "batch size must be", 1),
        (["submit", "alexnett", "in/"], "did you mean: alexnet", 1),
        (["submit", "get_model", "in/"], "unknown model", 1),
        (["submit", "alexnet", "in/", "--batch", "0"], "batch must be at least 1", 2),
        (["query_rate", "job404"], "no such job", 1),
        (["set_batch_size", job, "lots"], "set_batch_size: n must be a whole number, not 'lots'; usage: ", 2),
        (["explode"], "unknown command", 2),
    ]:
        r = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert msg in r.stderr, (args, r.stderr)


def test_every_shell_command_works_and_errors_print_help(make_cluster, tmp_path):
    c = make_cluster(workers=2, env={"IDUNNO_PRELOAD_MODELS": "mobilenet_v3_small"})
    load(c, 6)
    out = tmp_path / "shell.txt"
    with open(out, "w") as fh:
        console = Console(file=fh, width=200)

        def call(name, args):
            return c.ctl(name, **args)

        lines = ["submit mobilenet_v3_small in/ --batch 2", "pending", "start"]
        for line in lines:
            assert run_coordinator_line(line, call, console)
        job = c.ctl("jobs")[0]["job_id"]
        wait_done(c, [job])
        per_cmd = {"query_rate": f"query_rate {job}", "query_time": f"query_time {job}",
                   "set_batch_size": f"set_batch_size {job} 3", "results": f"results {job} --limit 2",
                   "submit": "submit mobilenet_v3_small in/img_000"}
        for name in COMMANDS:
            assert run_coordinator_line(per_cmd.get(name, name), call, console), name
        for bad in ("frobnicate", "query_rate", "set_batch_size x y", "help", "help submit", "'unclosed"):
            assert run_coordinator_line(bad, call, console)
        assert run_coordinator_line("quit", call, console) is False
    text = out.read_text()
    assert "unknown command 'frobnicate'" in text
    assert "set_batch_size <job> <n>" in text  # usage printed for bad arguments
    assert "query time" in text and "which worker runs what" in text and "members" in text
    # Autocomplete offers commands, then job ids and model names.
    from prompt_toolkit.document import Document  # noqa: PLC0415

    comp = CommandCompleter(list(COMMANDS), lambda cmd, i: [job] if cmd == "query_rate" else ["alexnet"])
    assert "query_rate" in [x.text for x in comp.get_completions(Document("query_r"), None)]
    assert [x.text for x in comp.get_completions(Document("query_rate j"), None)] == [job]


def test_metrics_match_commands_and_report_has_every_series(make_cluster, tmp_path):
    port = free_port_block("127.0.0.1", 1)
    c = make_cluster(workers=2, metrics_port=port, env={"IDUNNO_PRELOAD_MODELS": "mobilenet_v3_small,alexnet"})
    load(c, 16)
    a = c.ctl("submit", model="mobilenet_v3_small", inputs="in/", batch=2, start=True)["job_id"]
    b = c.ctl("submit", model="alexnet", inputs="in/", batch=2)["job_id"]
    wait_done(c, [a, b], timeout=120)

    def scrape() -> dict[str, float]:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        out = {}
        for line in body.splitlines():
            if line.startswith("idunno_") and " " in line:
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def settled():  # the snapshot behind /metrics is refreshed about once a second
        m = scrape()
        keys = [f'idunno_queries_completed_total{{job="{j}",model="{model}"}}'
                for j, model in ((a, "mobilenet_v3_small"), (b, "alexnet"))]
        return m if all(m.get(k) == 16 for k in keys) else None

    m = wait_for(settled, timeout=10, what="metrics to catch up")
    completed = c.ctl("completed")
    for job, model in ((a, "mobilenet_v3_small"), (b, "alexnet")):
        assert m[f'idunno_queries_completed_total{{job="{job}",model="{model}"}}'] == completed[job]["completed"]
        assert m[f'idunno_query_latency_seconds_count{{job="{job}",model="{model}"}}'] == 16
        assert m[f'idunno_pending_queries{{job="{job}"}}'] == 0
    assert m['idunno_members{role="worker",state="alive"}'] == 2
    # Report: one rate line per job, one histogram per job, a timeline row per worker.
    timeline = c.ctl("timeline")
    fig = build_figure(timeline)
    ax_rate, ax_lat, ax_work = fig.axes
    assert sorted(ln.get_label().split()[0] for ln in ax_rate.get_lines() if ln.get_label().startswith("job")) == [a, b]
    assert len(ax_lat.containers) == 2
    assert len(ax_work.get_yticks()) == 2
    path = write_report(timeline, str(tmp_path / "report.png"))
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(path).stat().st_size > 10_000


def test_noop_model_answers_every_query_without_torch_or_decoding(make_cluster, tmp_path):
    c = make_cluster(workers=2)
    n = 20
    load(c, n)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image: the no-op model never decodes its inputs")
    with SdfsClient(c.config()) as client:
        client.put(junk, "in/zz_junk.jpg")
    job = c.ctl("submit", model="noop", inputs="in/", batch=1, start=True)["job_id"]
    wait_done(c, [job], timeout=60)
    res = c.ctl("results", job=job)["results"]
    assert sorted(int(r["qid"].split(":")[1]) for r in res) == list(range(n + 1))
    assert all(r["top5"] == [["noop", 1.0]] and r["error"] is None for r in res)
