"""``idunno top``: a live view of the cluster (members, per-job progress, rates, latency, who runs what)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from cli import render
from cli.cluster import ctl
from common.config import Config
from common.rpc import RpcError


def jobs_panel(status: dict[str, Any]) -> Table:
    rates = status["rates"]["jobs"]
    times = status["times"]
    t = Table(title=f"jobs (rate gap between running jobs {status['rates']['gap']:.1%})", expand=True)
    for col in ("job", "state", "progress", "done", "img/s", "p50 s", "p95 s", "p99 s"):
        t.add_column(col)
    for j in status["jobs"]:
        jid = j["job_id"]
        lat = times[jid]["latency"]
        bar = ProgressBar(total=max(1, j["total"]), completed=j["completed"], width=30)
        state = f"{j['state']} (loading)" if j.get("loading") else j["state"]
        render._row(t, jid, state, bar, f"{j['completed']}/{j['total']}", f"{rates[jid]['rate']:.2f}",
                    render._f(lat["median"], 2), render._f(lat["p95"], 2), render._f(lat["p99"], 2))
    return t


def pool_panel(status: dict[str, Any], last: int = 5) -> Table:
    """The latest pool changes from the timeline (workers moved between model pools)."""
    t = Table(title="pool changes", expand=True)
    for col in ("at", "change"):
        t.add_column(col)
    for ev in [e for e in status.get("events", []) if e.get("kind") == "pool"][-last:]:
        render._row(t, render._ts(ev.get("ts")), str(ev.get("detail", "")))
    return t


def view(status: dict[str, Any]) -> Group:
    return Group(render.members(status["members"]), jobs_panel(status), render.vm_info(status["vm_info"]),
                 pool_panel(status))


def live_view(cfg: Config, console: Console, until_done: list[str] | None = None, refresh: float = 1.0,
              duration: float | None = None) -> dict[str, Any] | None:
    """Refresh every ``refresh`` s; stop when the listed jobs are done, after ``duration``, or on Ctrl-C."""
    end = time.monotonic() + duration if duration else None
    status = None
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        try:
            while end is None or time.monotonic() < end:
                try:
                    status = ctl(cfg, "status", timeout=2.0)
                except RpcError as exc:
                    live.update(render.plain((f"coordinator unreachable: {exc}", "red")))
                    time.sleep(refresh)  # display refresh cadence
                    continue
                live.update(view(status))
                if until_done and all(
                    j["state"] in ("done", "cancelled") for j in status["jobs"] if j["job_id"] in until_done
                ):
                    break
                time.sleep(refresh)  # display refresh cadence
        except KeyboardInterrupt:
            pass
    return status
