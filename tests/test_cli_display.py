"""Issue #13, finding 8: what users send (model, job, SDFS and node names, error texts) is shown
literally: never interpreted as rich markup or emoji codes, and never able to crash a display."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cli import render
from cli.sdfs_cmds import run_sdfs
from cli.shell import run_coordinator_line
from cli.top import view
from common.rpc import RpcError

HOSTILE = ["[/x]", "m/x[/bad]", "m/[bold red]SPOOF[/bold red]", "m/:warning:", "tail\\"]


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    # A default console (markup and emoji on), as the CLI makes: safety must not depend on its settings.
    return Console(file=out, width=1000, color_system=None), out


def summary() -> dict[str, Any]:
    return dict.fromkeys(("count", "avg", "std", "median", "p90", "p95", "p99"), 0.5) | {"count": 2}


def command_data(v: str) -> dict[str, Any]:
    """Every command's reply, with the hostile string ``v`` in every field a user can influence."""
    job = f"job1-{v}"
    jobs = [{"job_id": job, "model": v, "state": "running", "completed": 1, "total": 2, "pending": 1,
             "batch_size": 4, "weight": 1.0, "started": None, "finished": None}]
    members = {"seq": 1, "coordinator": {"addr": v, "role": "primary", "term": 1},
               "members": [{"node_id": f"{v}@1", "role": v, "state": "alive", "data_addr": v,
                            "joined_at": 0.0, "busy": 0}]}
    rates = {"gap": 0.0, "jobs": {job: {"rate": 1.0, "window": 10, "model": v, "state": "running",
                                        "overall": 1.0, "count": 1}}}
    times = {job: {"latency": summary(), "compute": summary(), "model": v}}
    vm = {f"{v}@1": {"models": [v], "credit": 1, "cost_per_image": 0.1, "rss_mb": 300, "peak_rss_mb": 350,
                     "budget_mb": 600, "model_mb": {v: 233},
                     "tasks": [{"task_id": "t1.1", "job": job, "queries": [f"{job}:{v}"]}]}}
    return {
        "jobs": jobs,
        "members": members,
        "query_rate": rates,
        "query_time": times,
        "pending": {job: {"state": "running", "pending_count": 1, "in_flight": 0, "pending": [f"{job}:0"]}},
        "completed": {job: {"model": v, "state": "done", "completed": 1, "total": 1, "errors": 0}},
        "vm_info": vm,
        "results": {"job": jobs[0], "sdfs_name": f"results/{job}",
                    "results": [{"qid": f"{job}:0", "input": v, "top5": [[v, 0.5]], "worker": v, "error": v,
                                 "latency": 0.5, "completed_at": 1.7e9, "dispatches": 2}], "next": 1, "in_flight": 0},
        "info": {"role": "primary", "term": 1, "members": 2, "sdfs": {"files": 1, v: {"k": v}}, "dropped": {v: 1}},
        "submit": jobs[0],
        "start": {"started": [job]},
        "cancel": jobs[0] | {"state": "cancelled", "dropped": 1, "in_flight": 0},
        "wait": jobs[0] | {"state": "done", "started": 1.0, "finished": 2.5},
        "status": {"members": members, "jobs": jobs, "rates": rates, "times": times, "vm_info": vm},
        "timeline": {"jobs": {job: {"model": v}}, "events": [{"kind": "job_added", "detail": v}]},
    }


@pytest.mark.parametrize("v", HOSTILE)
def test_every_command_output_shows_user_strings_literally(v):
    for name, data in command_data(v).items():
        c, out = console()
        render.show(c, name, data)
        assert v in out.getvalue(), (name, out.getvalue())


@pytest.mark.parametrize("v", HOSTILE)
def test_top_shows_user_strings_literally(v):
    c, out = console()
    c.print(view(command_data(v)["status"]))
    text = out.getvalue()
    assert f"job1-{v}" in text and f"{v}@1" in text


@pytest.mark.parametrize("v", HOSTILE)
def test_the_shell_survives_hostile_names_and_error_texts(v):
    c, out = console()
    data = command_data(v)

    def call(name: str, args: dict[str, Any]) -> Any:
        if name == "query_rate":
            raise RpcError("not_found", f"no such job {args.get('job')!r}; jobs: job1-{v}")
        return data[name]

    for line in ("jobs", "completed", "query_rate nothing", "vm_info"):
        assert run_coordinator_line(line, call, c) is True
    assert out.getvalue().count(f"job1-{v}") >= 3
    assert f"jobs: job1-{v}" in out.getvalue()


def test_vm_info_shows_memory_and_model_sizes_and_a_dash_when_not_reported():
    from cli import render

    c, out = console()
    vm = command_data("alexnet")["vm_info"]
    vm["old@1"] = {"models": ["m"], "credit": 0, "cost_per_image": None, "tasks": []}  # an older worker
    c.print(render.vm_info(vm))
    text = out.getvalue()
    assert "300 / 600 MB (peak 350)" in text and "alexnet (233 MB)" in text, text
    old = next(line for line in text.splitlines() if "old@1" in line)
    assert "│ m " in old and "│ - " in old, old


def test_help_text_is_not_markup():
    c, out = console()
    run_coordinator_line("help pending", lambda name, args: None, c)
    assert "pending [job]" in out.getvalue()


class FakeSdfs:
    def __init__(self, name: str) -> None:
        self.name = name

    def ls(self, pattern: str) -> list[dict[str, Any]]:
        return [{"name": self.name, "versions": [{"version": 1, "size": 3, "mtime": 0.0,
                                                  "replicas": [{"node_id": f"{self.name}@1"}]}]}]

    def put(self, local: str, name: str) -> int:
        return 1

    def get(self, name: str, local: str) -> dict[str, Any]:
        return {"version": 1, "size": 3}

    def delete(self, name: str) -> int:
        return 1

    def get_versions(self, name: str, k: int, local: str) -> list[dict[str, Any]]:
        return [{"version": 1}]

    def store(self, addr: str) -> list[list[Any]]:
        return [[self.name, 1, 3, "ab" * 32, 0.0]]


@pytest.mark.parametrize("v", HOSTILE)
def test_sdfs_commands_show_names_literally(v, tmp_path: Path):
    local = tmp_path / "f.txt"
    local.write_text("abc")
    client = FakeSdfs(v)
    for tokens in (["ls"], ["ls", v], ["put", str(local), v], ["get", v, str(tmp_path / "o")], ["delete", v],
                   ["get_versions", v, "1", str(tmp_path / "o")], ["store", v]):
        c, out = console()
        run_sdfs(client, c, tokens)  # type: ignore[arg-type]
        assert v in out.getvalue(), (tokens, out.getvalue())
