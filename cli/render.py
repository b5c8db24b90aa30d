"""Render command results as rich tables (one function per command, shared by shell and ctl).

Display never interprets user data: model, job, SDFS and node names and error texts come from
other users (or hostile peers), so everything shown through rich goes through :func:`plain`,
which makes literal text (no markup such as ``[/x]``, no emoji codes such as ``:warning:``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def plain(*parts: Any) -> Text:
    """Literal text for display: each part is shown as ``str(part)``, or ``(value, style)`` styled.

    The one way user-supplied strings reach rich (tables, titles, messages): a ``str`` given to
    rich is parsed as markup, so a name like ``m/x[/bad]`` would raise MarkupError for every later
    viewer and ``[bold red]SPOOF[/bold red]`` would be shown as something it is not.
    """
    return Text.assemble(*((str(p[0]), p[1]) if isinstance(p, tuple) else str(p) for p in parts))


def _row(t: Table, *cells: Any) -> None:
    """Add a table row: plain values become literal text; renderables (progress bars, Text) stay."""
    t.add_row(*(c if hasattr(c, "__rich_console__") or hasattr(c, "__rich__") else plain(c) for c in cells))


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
    t = Table(title=plain(f"members (view seq {data['seq']}; coordinator {coord})"))
    for col in ("node", "role", "state", "data address", "joined", "busy"):
        t.add_column(col)
    for m in data["members"]:
        style = {"alive": "green", "failed": "red", "left": "yellow"}.get(m["state"], "")
        _row(t, m["node_id"], m["role"], plain((m["state"], style)), m["data_addr"] or "-", _ts(m["joined_at"]),
                  str(m.get("busy", 0)))
    return t


def jobs(data: list[dict[str, Any]]) -> Table:
    t = Table(title="jobs")
    for col in ("job", "model", "state", "done/total", "pending", "batch", "weight", "started", "finished"):
        t.add_column(col)
    for j in data:
        state = f"{j['state']} (loading)" if j.get("loading") else j["state"]  # model not loaded anywhere yet
        _row(t, j["job_id"], j["model"], state, f"{j['completed']}/{j['total']}", str(j["pending"]),
                  str(j["batch_size"]), _f(j["weight"], 1), _ts(j["started"]), _ts(j["finished"]))
    return t


def query_rate(data: dict[str, Any]) -> Table:
    long = next((r.get("window_long") for r in data["jobs"].values()), None) or 30
    gap_long = data.get("gap_long")
    t = Table(title=f"query rate (images/s); rate gap between running jobs {data['gap']:.1%} "
                    f"over the short window" + (f", {gap_long:.1%} over {long:g} s" if gap_long is not None else ""))
    for col in ("job", "model", "state", "rate (img/s)", "window (s)", f"rate over {long:g} s", "avg since start",
                "completed", "duplicates dropped"):
        t.add_column(col)
    for job, r in data["jobs"].items():
        _row(t, job, r["model"], r.get("state", ""), _f(r["rate"], 2), _f(r["window"], 0),
             _f(r.get("rate_long"), 2), _f(r.get("overall"), 2), str(r["count"]), str(r.get("duplicates", 0)))
    return t


def query_time(data: dict[str, Any]) -> Table:
    t = Table(title="query time (seconds): latency = dispatch to result; compute = model time per image")
    for col in ("job", "kind", "count", "avg", "std", "median", "p90", "p95", "p99"):
        t.add_column(col)
    for job, d in data.items():
        for kind in ("latency", "compute"):
            s = d[kind]
            _row(t, job, kind, str(s["count"]), *(_f(s[k]) for k in ("avg", "std", "median", "p90", "p95", "p99")))
    return t


def pending(data: dict[str, Any]) -> Table:
    t = Table(title="pending queries")
    for col in ("job", "state", "pending", "in flight", "first pending"):
        t.add_column(col)
    for job, d in data.items():
        _row(t, job, d["state"], str(d["pending_count"]), str(d["in_flight"]), ", ".join(d["pending"][:5]) or "-")
    return t


def completed(data: dict[str, Any]) -> Table:
    t = Table(title="completed queries")
    for col in ("job", "model", "state", "completed", "total", "errors"):
        t.add_column(col)
    for job, d in data.items():
        _row(t, job, d["model"], d["state"], str(d["completed"]), str(d["total"]), str(d["errors"]))
    return t


def _memory(d: dict[str, Any]) -> str:
    """RSS / budget in MB (peak RSS in brackets when higher); "-" from a worker that reports none."""
    rss, peak, budget = d.get("rss_mb", 0), d.get("peak_rss_mb", 0), d.get("budget_mb", 0)
    if not rss and not budget:
        return "-"
    text = f"{rss or '?'} / {budget or '?'} MB"
    return text + (f" (peak {peak})" if peak > rss else "")


def _loaded(d: dict[str, Any]) -> str:
    sizes = d.get("model_mb", {})
    return ", ".join(f"{m} ({sizes[m]} MB)" if sizes.get(m) else m for m in d["models"]) or "-"


def vm_info(data: dict[str, Any]) -> Table:
    t = Table(title="which worker runs what")
    for col in ("worker", "pool", "models loaded", "RSS / budget", "free slots", "s/image", "running (job: queries)"):
        t.add_column(col)
    for node, d in data.items():
        running = "; ".join(f"{x['job']}: {', '.join(q.split(':')[-1] for q in x['queries'])}" for x in d["tasks"])
        _row(t, node, ", ".join(d.get("pool", [])) or "-", _loaded(d), _memory(d), str(d["credit"]),
             _f(d["cost_per_image"]), running or "idle")
    return t


def results(data: dict[str, Any]) -> Table:
    job = data["job"]
    t = Table(title=plain(f"results of {job['job_id']} ({job['completed']}/{job['total']}; SDFS {data['sdfs_name']})"))
    for col in ("query", "input", "top-1", "p", "worker", "latency (s)", "completed", "sent", "error"):
        t.add_column(col)
    for r in data["results"]:
        top = r.get("top5") or []
        _row(t, r["qid"], r["input"], top[0][0] if top else "-", _f(top[0][1]) if top else "-",
             r.get("worker") or "-", _f(r.get("latency")), _ts_ms(r.get("completed_at")),
             str(r.get("dispatches", 1)), r.get("error") or "")
    return t


def info(data: dict[str, Any]) -> Table:
    t = Table(title=plain(f"SDFS metadata (coordinator {data['role']}, term {data['term']}, "
                          f"{data['members']} members)"))
    t.add_column("key")
    t.add_column("value")
    for k, v in data["sdfs"].items():
        _row(t, k, json.dumps(v) if isinstance(v, dict) else str(v))
    for reason, n in sorted(data.get("dropped", {}).items()):
        _row(t, f"messages dropped ({reason})", str(n))
    return t


def simple(data: Any) -> str:
    from idunno.client import dumps  # noqa: PLC0415

    return dumps(data, indent=2)


RENDERERS = {
    "members": members, "jobs": jobs, "query_rate": query_rate, "query_time": query_time, "pending": pending,
    "completed": completed, "vm_info": vm_info, "results": results, "info": info,
}


def show(console: Console, command: str, data: Any) -> None:
    fn = RENDERERS.get(command)
    if command == "submit" and isinstance(data, dict):
        console.print(plain(f"submitted {data['job_id']}: {data['model']} over {data['total']} inputs, "
                            f"batch {data['batch_size']}, state {data['state']}"))
    elif command == "start":
        console.print(plain(f"started: {', '.join(data['started']) or 'nothing queued'}"))
    elif command == "cancel":
        console.print(plain(f"{data['job_id']} {data['state']}: {data['dropped']} pending queries dropped, "
                            f"{data['in_flight']} in flight will finish; {data['completed']}/{data['total']} "
                            f"results kept"))
    elif command == "wait":
        took = (data["finished"] - data["started"]) if data.get("started") and data.get("finished") else None
        console.print(plain(f"{data['job_id']} {data['state']}: {data['completed']}/{data['total']} results"
                            f"{f' in {took:.1f}s' if took is not None else ''}"))
    elif fn is None:
        console.print(plain(simple(data)))
    else:
        console.print(fn(data))


def error(console: Console, message: Any) -> None:
    """``error: <message>`` in red, the message shown literally (it often quotes user input)."""
    console.print(plain(("error:", "red"), " ", message))
