"""Render command results as rich tables (one function per command, shared by shell and ctl)."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _e(x: Any) -> str:
    """User-supplied text (job ids carry model names, SDFS names, error messages) shown literally."""
    return escape(str(x)) if x is not None else "-"


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ts(x: float | None) -> str:
    return dt.datetime.fromtimestamp(x).strftime("%H:%M:%S") if x else "-"


def _ts_ms(x: float | None) -> str:
    return dt.datetime.fromtimestamp(x).strftime("%H:%M:%S.%f")[:-3] if x else "-"


def members(data: dict[str, Any]) -> Table:
    c = data.get("coordinator", {})
    coord = f"{c.get('addr')} {c.get('role')} term {c.get('term')}"
    t = Table(title=f"members (epoch {data['epoch']}; coordinator {coord})")
    for col in ("node", "role", "state", "data address", "joined", "busy"):
        t.add_column(col)
    for m in data["members"]:
        style = {"alive": "green", "failed": "red", "left": "yellow"}.get(m["state"], "")
        t.add_row(_e(m["node_id"]), m["role"], f"[{style}]{m['state']}[/]", _e(m["data_addr"] or "-"),
                  _ts(m["joined_at"]),
                  str(m.get("busy", 0)))
    return t


def jobs(data: list[dict[str, Any]]) -> Table:
    t = Table(title="jobs")
    for col in ("job", "model", "state", "done/total", "pending", "batch", "weight", "started", "finished"):
        t.add_column(col)
    for j in data:
        t.add_row(_e(j["job_id"]), _e(j["model"]), j["state"], f"{j['completed']}/{j['total']}", str(j["pending"]),
                  str(j["batch_size"]), _f(j["weight"], 1), _ts(j["started"]), _ts(j["finished"]))
    return t


def query_rate(data: dict[str, Any]) -> Table:
    t = Table(title=f"query rate (images/s over the last window); rate gap between running jobs {data['gap']:.1%}")
    for col in ("job", "model", "state", "rate (img/s)", "window (s)", "avg since start", "completed",
                "duplicates dropped"):
        t.add_column(col)
    for job, r in data["jobs"].items():
        t.add_row(_e(job), _e(r["model"]), r.get("state", ""), _f(r["rate"], 2), _f(r["window"], 0),
                  _f(r.get("overall"), 2), str(r["count"]), str(r.get("duplicates", 0)))
    return t


def query_time(data: dict[str, Any]) -> Table:
    t = Table(title="query time (seconds): latency = dispatch to result; compute = model time per image")
    for col in ("job", "kind", "count", "avg", "std", "median", "p90", "p95", "p99"):
        t.add_column(col)
    for job, d in data.items():
        for kind in ("latency", "compute"):
            s = d[kind]
            t.add_row(_e(job), kind, str(s["count"]),
                      *(_f(s[k]) for k in ("avg", "std", "median", "p90", "p95", "p99")))
    return t


def pending(data: dict[str, Any]) -> Table:
    t = Table(title="pending queries")
    for col in ("job", "state", "pending", "in flight", "first pending"):
        t.add_column(col)
    for job, d in data.items():
        t.add_row(_e(job), d["state"], str(d["pending_count"]), str(d["in_flight"]),
                  _e(", ".join(d["pending"][:5]) or "-"))
    return t


def completed(data: dict[str, Any]) -> Table:
    t = Table(title="completed queries")
    for col in ("job", "model", "state", "completed", "total", "errors"):
        t.add_column(col)
    for job, d in data.items():
        t.add_row(_e(job), _e(d["model"]), d["state"], str(d["completed"]), str(d["total"]), str(d["errors"]))
    return t


def vm_info(data: dict[str, Any]) -> Table:
    t = Table(title="which worker runs what")
    for col in ("worker", "models loaded", "free slots", "s/image", "running (job: queries)"):
        t.add_column(col)
    for node, d in data.items():
        running = "; ".join(f"{x['job']}: {', '.join(q.split(':')[-1] for q in x['queries'])}" for x in d["tasks"])
        t.add_row(_e(node), _e(", ".join(d["models"]) or "-"), str(d["credit"]), _f(d["cost_per_image"]),
                  _e(running or "idle"))
    return t


def results(data: dict[str, Any]) -> Table:
    job = data["job"]
    t = Table(title=_e(f"results of {job['job_id']} ({job['completed']}/{job['total']}; SDFS {data['sdfs_name']})"))
    for col in ("query", "input", "top-1", "p", "worker", "latency (s)", "completed", "sent", "error"):
        t.add_column(col)
    for r in data["results"]:
        top = r.get("top5") or []
        t.add_row(_e(r["qid"]), _e(r["input"]), _e(top[0][0]) if top else "-", _f(top[0][1]) if top else "-",
                  _e(r.get("worker", "-")), _f(r.get("latency")), _ts_ms(r.get("completed_at")),
                  str(r.get("dispatches", 1)), _e(r.get("error") or ""))
    return t


def info(data: dict[str, Any]) -> Table:
    t = Table(title=f"SDFS metadata (coordinator {data['role']}, term {data['term']}, {data['members']} members)")
    t.add_column("key")
    t.add_column("value")
    for k, v in data["sdfs"].items():
        t.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    return t


def simple(data: Any) -> str:
    from idunno.client import dumps  # noqa: PLC0415

    return escape(dumps(data, indent=2))


RENDERERS = {
    "members": members, "jobs": jobs, "query_rate": query_rate, "query_time": query_time, "pending": pending,
    "completed": completed, "vm_info": vm_info, "results": results, "info": info,
}


def show(console: Console, command: str, data: Any) -> None:
    fn = RENDERERS.get(command)
    if command == "submit" and isinstance(data, dict):
        console.print(f"submitted {_e(data['job_id'])}: {_e(data['model'])} over {data['total']} inputs, "
                      f"batch {data['batch_size']}, state {data['state']}")
    elif command == "start":
        console.print(f"started: {_e(', '.join(data['started']) or 'nothing queued')}")
    elif command == "cancel":
        console.print(f"{_e(data['job_id'])} {data['state']}: {data['dropped']} pending queries dropped, "
                      f"{data['in_flight']} in flight will finish; {data['completed']}/{data['total']} results kept")
    elif command == "wait":
        took = (data["finished"] - data["started"]) if data.get("started") and data.get("finished") else None
        console.print(f"{_e(data['job_id'])} {data['state']}: {data['completed']}/{data['total']} results"
                      f"{f' in {took:.1f}s' if took is not None else ''}")
    elif fn is None:
        console.print(simple(data))
    else:
        console.print(fn(data))
