# ruff: noqa: E402  (sys.path must be fixed before the project's packages are imported; see below)
"""Helpers shared by the benchmarks (a package, so ``make bench``'s ``bench/*.py`` loop skips it).

Everything here is read-only with respect to the system under test: clusters are started through
:class:`cli.cluster.LocalCluster`, commands go through the public RPC, and :class:`JournalObserver`
only subscribes to the coordinators' PUB sockets (what the hot standby itself receives).
"""

from __future__ import annotations

import bisect
import contextlib
import importlib.util
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# ``python bench/sdfs.py`` puts bench/ first on sys.path, where bench/sdfs.py would shadow the
# project's ``sdfs`` package. Every script imports benchlib before any project module, so taking
# bench/ off the path here lets the project packages resolve normally.
_BENCH = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]


def _bench_module(name: str) -> types.ModuleType:
    """Import bench/<name>.py (off sys.path now) by file, registered under its plain name.

    Registered in ``sys.modules`` so that pickling by reference works: ``cpu_hog``'s spawned
    processes re-run the benchmark script, which imports benchlib and so this module, before they
    unpickle ``hog._spin``.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_hog = _bench_module("hog")


@contextlib.contextmanager
def cpu_hog(per_core: int = 2) -> Iterator[list[int]]:
    """bench/hog.py's ``cpu_hog`` (``per_core`` busy processes per core while the block runs).

    Its processes are spawned, and a spawned process re-runs the benchmark script with the parent's
    sys.path before it unpickles its target: bench/ goes back on the path (last, behind the project)
    while they start, so that the script's ``import benchlib`` works there. A hog that died at start
    would make a "loaded" measurement an idle one: checked.
    """
    path = str(_BENCH)
    with contextlib.ExitStack() as stack:
        sys.path.append(path)
        try:
            pids = stack.enter_context(_hog.cpu_hog(per_core))
        finally:
            sys.path.remove(path)
        time.sleep(1.0)  # long enough for a failed start (an import error) to show
        dead = [p for p in pids if not _running(p)]
        if dead:
            raise RuntimeError(f"{len(dead)} of {len(pids)} CPU hog processes died at start")
        yield pids


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False

import zmq
from rich.console import Console
from rich.table import Table

from cli.cluster import LocalCluster, Proc
from common import security
from common.config import Config
from common.logstream import PUB_PORT_OFFSET
from common.protocol import Command, ProtocolError, StateUpdate, StateUpdates, Topic, decode
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
def running(cluster: LocalCluster, timeout: float = 90.0, port_retries: int = 2) -> Iterator[LocalCluster]:
    """Start the cluster and always stop it (processes never outlive the benchmark).

    ``free_port_block`` can only tell that a port is free *now*: on a machine where other clusters
    start too, one of ours may be taken before the daemon binds it. Then (a daemon's log says so)
    the cluster is stopped and started again on fresh ports, up to ``port_retries`` times.
    A SIGTERM (``timeout``, ``kill``) ends the benchmark as Ctrl-C does, through the clean-up: by
    default Python dies at once and the daemons, in sessions of their own, outlived it.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        for attempt in range(port_retries + 1):
            try:
                cluster.start(timeout=timeout)
                break
            except RuntimeError:
                taken = _port_taken(cluster)
                if attempt == port_retries or not taken:
                    raise
                console.print(f"[yellow]{taken}: a port was taken between choosing and binding it; "
                              f"starting the cluster again[/]")
                cluster.stop()
                cluster.procs.clear()
        yield cluster
    except BaseException:
        show_logs(cluster)
        raise
    finally:
        if main:  # a second SIGTERM (``timeout -k``) must not cut the clean-up short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
        left = [p for p in cluster.procs if p.popen.poll() is None]
        if left:
            for p in left:
                p.popen.kill()
                p.popen.wait(timeout=5)
            console.print(f"[red]warning: {len(left)} cluster processes had to be killed[/]")
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _port_taken(cluster: LocalCluster) -> str:
    """The log of an exited daemon that failed with 'Address already in use' ('' if none)."""
    for p in cluster.procs:
        if p.popen.poll() is not None and p.log_path:
            try:
                if "Address already in use" in Path(p.log_path).read_text(errors="replace"):
                    return p.log_path
            except OSError:
                continue
    return ""


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


# A worker's log line for each model load (worker/executor.py).
LOADED = re.compile(r"loaded (\S+) with weights from .* in ([0-9.]+)s")


def model_loads(cluster: LocalCluster) -> dict[str, list[float]]:
    """Seconds of every model load, per model, from the workers' ``loaded ... in Ns`` log lines."""
    out: dict[str, list[float]] = {}
    for p in cluster.worker_procs():
        try:
            text = Path(p.log_path).read_text(errors="replace")
        except OSError:
            continue
        for model, secs in LOADED.findall(text):
            out.setdefault(model, []).append(float(secs))
    return out


def load_seconds(cluster: LocalCluster) -> dict[str, float]:
    """Seconds spent loading each model, summed over the workers (their logs)."""
    return {m: sum(v) for m, v in model_loads(cluster).items()}


def cli_env(cluster: LocalCluster) -> dict[str, str]:
    """The environment of a user's shell pointed at ``cluster`` (none of the benchmark's IDUNNO_ settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDUNNO_")}
    env.update(IDUNNO_COORDINATOR=cluster.coordinator, IDUNNO_STANDBY=cluster.standby_addr,
               IDUNNO_DATA_DIR=cluster.data_dir, IDUNNO_CURVE_DIR=cluster.curve_dir)
    return env


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat, after the command name); 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def tree_cpu_seconds(pid: int) -> float:
    """``cpu_seconds`` of a process and its live descendants (a worker's pulse sidecar, say)."""
    total = cpu_seconds(pid)
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(tree_cpu_seconds(int(k)) for k in kids)


def cluster_cpu_seconds(cluster: LocalCluster) -> float:
    """CPU seconds used so far by every live process of the cluster (coordinators, workers, their children)."""
    return sum(tree_cpu_seconds(p.popen.pid) for p in cluster.procs if p.popen.poll() is None)


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
            if self.cfg.curve_dir:  # the state journal is for coordinator keys only
                security.apply(s, False, security.load(self.cfg.curve_dir, security.COORDINATOR))
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
                        # One loop iteration's ops travel in one StateUpdates frame (issue #14).
                        updates = msg.updates() if isinstance(msg, StateUpdates) else [msg]
                        now = time.time()
                        with self.lock:
                            self.records.extend((now, socks[s], u) for u in updates
                                                if isinstance(u, StateUpdate) and u.op.startswith("task."))
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


# ---------------------------------------------------------------------------------------------
# failure detection under load: kills, detection time, a steady supply of jobs

FIXED_TIMEOUT_ENV = {"IDUNNO_FAILURE_MAX_TIMEOUT": "1.5"}  # ceiling = floor: the old fixed 1.5 s timeout
DETECTORS: list[tuple[str, dict[str, str]]] = [("adaptive", {}), ("fixed 1.5 s", FIXED_TIMEOUT_ENV)]


def info(cluster: LocalCluster, timeout: float = 5.0) -> dict[str, Any]:
    """``info``: failures_detected, loop_stall_max, heartbeat_gap_max (and the SDFS summary)."""
    return cluster.ctl("info", timeout=timeout)


def alive_worker_procs(cluster: LocalCluster, members: list[dict[str, Any]]) -> list[tuple[Proc, str]]:
    """(process, node id) of every running worker process the coordinator sees alive."""
    alive = {m["data_addr"]: m["node_id"] for m in members if m["state"] == "alive" and m["role"] == "worker"}
    return [(p, alive[p.addr]) for p in cluster.worker_procs() if p.addr in alive]


def kill_and_detect(cluster: LocalCluster, rpc: RpcClient, victim: Proc, node: str, poll: float = 0.02,
                    limit: float = 30.0, events_job: str | None = None) -> tuple[float, float | None]:
    """SIGKILL ``victim``; poll ``members`` every ``poll`` s until ``node`` is 'failed'.

    Returns (kill -> seen failed in members, kill -> the coordinator's own ``fail`` event or None).
    ``events_job`` limits the ``timeline`` call that fetches the events to one job (a timeline of
    every job of a long run is built on the coordinator's loop and would stall it).
    """
    kill_wall = time.time()
    k0 = time.perf_counter()
    cluster.kill(victim)
    found = None
    while time.perf_counter() - k0 < limit:
        try:
            ms = rpc.call(Command(0, "members", {}), timeout=1.0).data["members"]
            m = next((m for m in ms if m["node_id"] == node), None)
        except RpcError:
            m = None
        if m is not None and m["state"] == "failed":
            found = time.perf_counter() - k0
            break
        time.sleep(poll)
    if found is None:
        raise RuntimeError(f"{node} was not declared failed within {limit:.0f}s")
    ev_delay = None
    try:
        args = {"job": events_job} if events_job else {}
        events = cluster.ctl("timeline", timeout=10.0, **args)["events"]
        ev = next((e for e in events if e["kind"] == "fail" and e["detail"] == node), None)
        ev_delay = ev["ts"] - kill_wall if ev else None
    except RpcError:
        pass
    return found, ev_delay


def wait_joined(cluster: LocalCluster, proc: Proc, timeout: float = 180.0) -> float:
    """Wait until a newly started worker is alive in ``members``; return the seconds waited."""
    t0 = time.perf_counter()

    def joined() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"worker {proc.addr} exited with {proc.popen.returncode}; see {proc.log_path}")
        return any(m["data_addr"] == proc.addr and m["state"] == "alive" for m in cluster.alive_workers())

    wait_until(joined, timeout, 0.1, f"worker {proc.addr} to join")
    return time.perf_counter() - t0


class JobFeeder:
    """Keeps every worker busy: per model, a new job over the next input prefix is submitted as soon
    as the model's newest job has nothing left pending (all dispatched), so the queue never runs dry.

    ``prefixes`` are SDFS prefixes (with a trailing slash), used in turn; a dict gives each model its
    own list (a cheap model can take bigger jobs than an expensive one). Submitted job ids are in
    ``jobs`` ((job id, model, prefix), in order); RPC errors are counted, not raised (the cluster is
    under load and the feeder must not die of one slow answer).
    """

    def __init__(self, cluster: LocalCluster, models: list[str], prefixes: list[str] | dict[str, list[str]],
                 batch: int = 8, interval: float = 0.5) -> None:
        self.cluster = cluster
        self.models = models
        self.prefixes = prefixes if isinstance(prefixes, dict) else dict.fromkeys(models, prefixes)
        self.batch = batch
        self.interval = interval
        self.jobs: list[tuple[str, str, str]] = []
        self.rpc_errors = 0
        self._next = dict.fromkeys(models, 0)
        self._newest: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-feeder", daemon=True)

    def start(self) -> JobFeeder:
        for model in self.models:
            self._submit(model)
        self._thread.start()
        return self

    def _submit(self, model: str) -> None:
        k = self._next[model]
        prefixes = self.prefixes[model]
        # Models start at different prefixes so that they do not read the same files at once.
        prefix = prefixes[(k + self.models.index(model) * len(prefixes) // len(self.models)) % len(prefixes)]
        job = self.cluster.ctl("submit", timeout=10.0, model=model, inputs=prefix, batch=self.batch,
                               start=True)["job_id"]
        self._next[model] = k + 1
        self._newest[model] = job
        self.jobs.append((job, model, prefix))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                state = {j["job_id"]: j for j in self.cluster.ctl("jobs", timeout=5.0)}
                for model in self.models:
                    newest = state.get(self._newest[model])
                    if newest is not None and newest["pending"] == 0:
                        self._submit(model)
            except RpcError:
                self.rpc_errors += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


LOG_TS = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "


def detections(cluster: LocalCluster, t_start_wall: float, killed: set[str]) -> list[list[Any]]:
    """Every 'member ... failed' line of the coordinators' logs: [t since ``t_start_wall``, log, node,
    silent for, the member's age (since its join), 'real SIGKILL' if in ``killed`` else 'FALSE']."""
    joined: dict[str, float] = {}
    rows = []
    for p in cluster.procs:
        if p.role not in ("coordinator", "standby") or not p.log_path:
            continue
        try:
            text = Path(p.log_path).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            m = re.match(LOG_TS + r".*member (\S+) (joined|failed \(silent for ([\d.]+)s\))", line)
            if not m:
                continue
            ts = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(m.group(1)[20:]) / 1000
            node = m.group(2)
            if m.group(3) == "joined":
                joined[node] = ts
            else:
                age = ts - joined[node] if node in joined else None
                rows.append([round(ts - t_start_wall, 1), Path(p.log_path).name, node, float(m.group(4)), age,
                             "real SIGKILL" if node in killed else "FALSE"])
    return rows
