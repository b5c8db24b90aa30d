# ruff: noqa: E402  (sys.path must be fixed before the project's packages are imported; see below)
"""Helpers shared by the benchmarks (a package, so ``make bench``'s ``bench/*.py`` loop skips it).

Everything here is read-only with respect to the system under test: clusters are started through
:class:`cli.cluster.LocalCluster`, commands go through the public RPC, and :class:`JournalObserver`
only subscribes to the coordinators' PUB sockets (what the hot standby itself receives).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# ``python bench/sdfs.py`` puts bench/ first on sys.path, where bench/sdfs.py would shadow the
# project's ``sdfs`` package. Every script imports benchlib before any project module, so taking
# bench/ off the path here lets the project packages resolve normally.
_BENCH = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

import zmq
from rich.console import Console
from rich.table import Table

from cli.cluster import LocalCluster
from common.config import Config
from common.logstream import PUB_PORT_OFFSET
from common.protocol import Command, ProtocolError, StateUpdate, Topic, decode
from common.rpc import RpcClient, RpcError
from common.transport import offset_addr, tcp

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"

console = Console(width=200) if not os.isatty(1) else Console()


def images() -> list[Path]:
    files = sorted(DATA.glob("*.jpg"))
    if not files:
        raise SystemExit(f"no test images in {DATA}")
    return files


def headline(text: str) -> None:
    console.print(f"HEADLINE: {text}", highlight=False, soft_wrap=True)


def table(title: str, columns: list[str], rows: list[list[Any]], caption: str | None = None) -> Table:
    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    console.print(t)
    return t


def ratio(x: float) -> str:
    """A ratio for a headline: two decimals, three significant digits when small."""
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.2f}x" if abs(x) >= 0.1 else f"{x:.3g}x"


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def stats3(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (math.nan, math.nan, math.nan)
    return (min(values), statistics.median(values), max(values))


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll another process's state (there is no event to wait on) until ``pred`` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A scratch directory for the cluster; ``BENCH_KEEP=1`` keeps it (and the daemons' logs) afterwards."""
    if os.environ.get("BENCH_KEEP"):
        d = Path(tempfile.mkdtemp(prefix=prefix))
        console.print(f"keeping {d} (BENCH_KEEP)")
        yield d
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)


@contextlib.contextmanager
def running(cluster: LocalCluster, timeout: float = 90.0) -> Iterator[LocalCluster]:
    """Start the cluster and always stop it (processes never outlive the benchmark)."""
    try:
        cluster.start(timeout=timeout)
        yield cluster
    except BaseException:
        show_logs(cluster)
        raise
    finally:
        cluster.stop()
        left = [p for p in cluster.procs if p.popen.poll() is None]
        if left:
            for p in left:
                p.popen.kill()
                p.popen.wait(timeout=5)
            console.print(f"[red]warning: {len(left)} cluster processes had to be killed[/]")


def show_logs(cluster: LocalCluster, lines: int = 25) -> None:
    """On a failure: the end of every coordinator's log (the temp directory is removed afterwards)."""
    for p in cluster.procs:
        if p.role in ("coordinator", "standby") and p.log_path:
            try:
                tail = Path(p.log_path).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            console.print(f"[yellow]--- last lines of {p.log_path}[/]")
            for line in tail:
                console.print(line, markup=False, highlight=False)


def coord_info(cluster: LocalCluster, addr: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """``members`` asked of one specific coordinator: its role and term (None if it does not answer)."""
    cfg = cluster.config().replace(coordinator=addr, standby="", request_retries=1)
    client = RpcClient([addr], cfg)
    try:
        return client.call(Command(0, "members", {}), timeout=timeout, retries=1).data["coordinator"]
    except RpcError:
        return None
    finally:
        client.close()


def wait_models(cluster: LocalCluster, models: list[str], n: int, timeout: float = 120.0) -> None:
    """Wait until ``n`` workers report every one of ``models`` loaded (preloading finished)."""

    def ready() -> bool:
        try:
            info = cluster.ctl("vm_info", timeout=2.0)
        except RpcError:
            return False
        return sum(1 for w in info.values() if set(models) <= set(w["models"])) >= n

    wait_until(ready, timeout, 0.25, f"{n} workers with {', '.join(models)} loaded")


def put_copies(cluster: LocalCluster, copies: int, prefix: str = "copies") -> tuple[int, float]:
    """Put the 100 test images ``copies`` times under ``prefix/<k>/``; return (files, seconds)."""
    from sdfs.client import SdfsClient  # noqa: PLC0415

    files = images()
    items = [(str(p), f"{prefix}/{k}/{p.name}") for k in range(copies) for p in files]
    t0 = time.perf_counter()
    with SdfsClient(cluster.config()) as client:
        client.put_many(items)
    return len(items), time.perf_counter() - t0


def _proc_status_kib(pid: int, key: str) -> int | None:
    """One ``kB`` field of /proc/<pid>/status, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def vm_hwm_kib(pid: int) -> int | None:
    return _proc_status_kib(pid, "VmHWM:")


def vm_rss_kib(pid: int) -> int | None:
    return _proc_status_kib(pid, "VmRSS:")


def wait_memory_settled(pids: list[int], hold: float = 3.0, tolerance_kib: int = 5 * 1024,
                        timeout: float = 90.0) -> float:
    """Wait until no process's RSS moved by more than ``tolerance_kib`` for ``hold`` seconds
    (workers import torch in the background after joining). Returns the seconds waited."""
    t0 = time.monotonic()
    last = {p: vm_rss_kib(p) or 0 for p in pids}
    stable_since = time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        now = {p: vm_rss_kib(p) or 0 for p in pids}
        if any(abs(now[p] - last[p]) > tolerance_kib for p in pids):
            stable_since = time.monotonic()
            last = now
        elif time.monotonic() - stable_since >= hold:
            break
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------------
# rate series from `timeline`


class Series:
    """A job's ``timeline`` rate series ([t, images/s over the window ending at t]), linearly interpolated."""

    def __init__(self, points: list[list[float]]) -> None:
        self.t = [float(p[0]) for p in points]
        self.r = [float(p[1]) for p in points]

    def __call__(self, t: float) -> float:
        if not self.t or t < self.t[0]:
            return 0.0
        if t >= self.t[-1]:
            return self.r[-1]
        i = bisect.bisect_right(self.t, t)
        t0, t1, r0, r1 = self.t[i - 1], self.t[i], self.r[i - 1], self.r[i]
        return r0 + (r1 - r0) * (t - t0) / (t1 - t0) if t1 > t0 else r1

    @property
    def end(self) -> float:
        return self.t[-1] if self.t else 0.0


def grid(t0: float, t1: float, step: float = 1.0) -> list[float]:
    n = max(0, int((t1 - t0) / step) + 1)
    return [t0 + i * step for i in range(n)]


def first_stable(ts: list[float], ok: list[bool], hold: float) -> float | None:
    """First grid time t such that ``ok`` holds at every grid point in [t, t + hold] (None if never)."""
    for i, t in enumerate(ts):
        if ts[-1] < t + hold:
            return None
        if all(ok[j] for j in range(i, len(ts)) if ts[j] <= t + hold):
            return t
    return None


# ---------------------------------------------------------------------------------------------
# passive observer of the coordinators' replication journal


class JournalObserver:
    """Subscribes to every coordinator's PUB (topic ``state``) and records task ops with receipt time.

    Only the primary journals, so the records of all coordinators together are every dispatch,
    requeue and result in order, whichever coordinator was primary at the time.
    """

    def __init__(self, addrs: list[str], cfg: Config) -> None:
        self.addrs = addrs
        self.cfg = cfg
        self.records: list[tuple[float, str, StateUpdate]] = []  # (wall time received, publisher, update)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="journal-observer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        socks = {}
        poller = zmq.Poller()
        for a in self.addrs:
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVHWM, 1_000_000)
            s.setsockopt(zmq.SUBSCRIBE, Topic.STATE)
            s.connect(tcp(offset_addr(a, PUB_PORT_OFFSET)))
            socks[s] = a
            poller.register(s, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                for s, _ in poller.poll(50):
                    while True:
                        try:
                            frames = s.recv_multipart(flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(frames) != 2:
                            continue
                        try:
                            msg = decode(frames[1], self.cfg.max_frame_bytes)
                        except ProtocolError:
                            continue
                        if isinstance(msg, StateUpdate) and msg.op.startswith("task."):
                            with self.lock:
                                self.records.append((time.time(), socks[s], msg))
        finally:
            for s in socks:
                s.close(0)

    def snapshot(self) -> list[tuple[float, str, StateUpdate]]:
        with self.lock:
            return list(self.records)

    def dispatches(self) -> list[tuple[float, str, dict[str, Any]]]:
        """(dispatch wall time from the coordinator, publisher, op data) of every task.dispatch."""
        return [(u.data["dispatched"], a, u.data) for _, a, u in self.snapshot() if u.op == "task.dispatch"]

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=2)
