"""A local cluster on loopback: coordinator, standby and N workers as separate processes.

Used by ``idunno up/down/demo``, the benchmarks and the multi-process tests. The cluster's
addresses and pids are written to ``<data_dir>/cluster.json`` so other commands find it, with each
process's start time and command line: ``idunno down`` signals a pid only while it is still that
process (a stale file must never kill whatever reused the pid).
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.commands import COMMANDS, check_args, with_request_id
from common.config import Config
from common.protocol import Command
from common.rpc import RpcClient, RpcError
from idunno.client import PRIMARY_HINT_FILE, STATE_FILE, read_cluster_state


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port_block(host: str = Config.host, size: int = 3) -> int:
    """A port P such that P..P+size-1 are free right now (coordinators use three).

    Picked below the kernel's ephemeral range: a port handed out by ``bind(0)`` is also what the
    kernel gives the next outgoing connection, so on a busy machine some process's connect() could
    take it between this check and the daemon's bind (seen in CI: a worker exiting with
    EADDRINUSE at start). Below that range only another explicit bind can collide.
    """
    lo, _ = _ephemeral_range()
    low, high = (10_000, lo - size) if lo - size > 11_000 else (1024, 65535 - size)
    rng = random.Random()  # not the global one: tests seed that
    for _ in range(500):
        base = rng.randrange(low, high)
        socks = []
        try:
            for p in range(base, base + size):
                t = socket.socket()
                t.bind((host, p))
                socks.append(t)
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free port block found")


def ctl(cfg: Config, name: str, timeout: float | None = None, **args: Any) -> Any:
    """One command to the coordinators (raises RpcError on failure)."""
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name}")
    args = check_args(name, args)  # a clear error here, not an overflow in the encoder
    client = RpcClient(cfg.coordinators, cfg)
    try:
        return client.call(Command(0, name, with_request_id(name, args)), timeout=timeout).data  # type: ignore[attr-defined]
    finally:
        client.close()


@dataclass
class Proc:
    role: str
    popen: subprocess.Popen
    addr: str = ""
    log_path: str = ""
    data_dir: str = ""
    name: str = ""  # a worker's stable name (its identity and data directory)
    started: float = field(default_factory=time.time)  # wall clock, as members' joined_at


@dataclass
class LocalCluster:
    workers: int = 4
    standby: bool = True
    data_dir: str = "var"
    host: str = Config.host  # loopback by default; a multi-host harness passes its own addresses
    torch_threads: int = 0  # 0: pick from cpu_count and worker count
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    metrics_port: int = 0  # Prometheus endpoint of the primary coordinator (0 = none)
    # No keys: plaintext, unauthenticated. Only by this explicit choice (or IDUNNO_INSECURE=1, which
    # the daemons honour as well: e.g. to measure what CURVE costs a test run).
    insecure: bool = field(default_factory=lambda: env_insecure())
    curve_dir: str = ""  # the cluster's keys: made in <data_dir>/keys on first start (or IDUNNO_CURVE_DIR)
    procs: list[Proc] = field(default_factory=list)
    coordinator: str = ""
    standby_addr: str = ""

    def __post_init__(self) -> None:
        self.data_dir = str(Path(self.data_dir).resolve())
        if not self.torch_threads:
            self.torch_threads = max(1, (os.cpu_count() or 1) // max(1, self.workers))

    # -- configuration shared by every process --------------------------------------------------
    def config(self) -> Config:
        return Config(coordinator=self.coordinator, standby=self.standby_addr, host=self.host,
                      torch_threads=self.torch_threads, data_dir=self.data_dir, curve_dir=self.curve_dir,
                      insecure=self.insecure)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["IDUNNO_COORDINATOR"] = self.coordinator
        env["IDUNNO_STANDBY"] = self.standby_addr
        env["IDUNNO_HOST"] = self.host
        env["IDUNNO_TORCH_THREADS"] = str(self.torch_threads)
        env["IDUNNO_DATA_DIR"] = self.data_dir
        env["IDUNNO_CURVE_DIR"] = self.curve_dir
        env["IDUNNO_INSECURE"] = "1" if self.insecure else ""
        env.setdefault("OMP_NUM_THREADS", str(self.torch_threads))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, role: str, args: list[str], name: str) -> Proc:
        # Any daemon started (also one restarted after stop(), without start()) gets the cluster's
        # keys, and this launcher keeps its client key to reach them.
        self.setup_keys()
        logs = Path(self.data_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        popen = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args, *self.extra_args],
            env=self._env(), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the launcher's terminal is handled by the launcher
        )
        fh.close()
        proc = Proc(role, popen, log_path=str(log_path))
        self.procs.append(proc)
        return proc

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 30.0) -> LocalCluster:
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self.setup_keys()
        self.coordinator = f"{self.host}:{free_port_block(self.host)}"
        self.standby_addr = f"{self.host}:{free_port_block(self.host)}" if self.standby else ""
        self.start_coordinator(primary=True)
        if self.standby:
            self.start_coordinator(primary=False)
        for _ in range(self.workers):
            self.add_worker()
        self.save()
        if wait:
            self.wait_ready(self.workers, timeout)
        return self

    def setup_keys(self) -> str:
        """The cluster's CURVE keys: IDUNNO_CURVE_DIR if given, else ``<data_dir>/keys``, made on first
        use. Every daemon gets them through its environment; this launcher (readiness checks, `ctl`)
        and every client of ``config()`` use the client key."""
        from common import security  # noqa: PLC0415

        if self.insecure:
            self.curve_dir = ""
            security.DEFAULT_CLIENT = None
            return ""

        d = self.env.get("IDUNNO_CURVE_DIR") or os.environ.get("IDUNNO_CURVE_DIR") or str(Path(self.data_dir) / "keys")
        d = str(Path(d).resolve())
        if not security.has_keys(d):
            security.init_keys(d)
        self.curve_dir = d
        security.DEFAULT_CLIENT = security.load(d, security.CLIENT)  # this launcher's clients reach its cluster
        return d

    def client_env(self) -> dict[str, str]:
        """What a CLI or script process needs to reach this cluster (addresses and the client keys)."""
        return {"IDUNNO_COORDINATOR": self.coordinator, "IDUNNO_STANDBY": self.standby_addr,
                "IDUNNO_CURVE_DIR": self.curve_dir}

    def start_coordinator(self, primary: bool, standby_mode: bool | None = None) -> Proc:
        """Start (or restart) the coordinator of the primary slot or the standby slot. Each slot has a
        stable data directory (coord-0, coord-1), whatever ports this run uses, so a cluster brought
        down and up again finds its coordinators' state."""
        me, peer = (self.coordinator, self.standby_addr) if primary else (self.standby_addr, self.coordinator)
        slot = COORD_SLOTS[0 if primary else 1]
        args = ["coordinator", "--bind", me, "--data-dir", str(Path(self.data_dir) / slot)]
        if peer:
            args += ["--peer", peer]
        if standby_mode if standby_mode is not None else not primary:
            args.append("--standby")
        if primary and self.metrics_port:
            args += ["--metrics-port", str(self.metrics_port)]
        proc = self._spawn("coordinator" if primary else "standby", args, slot)
        proc.addr = me
        proc.data_dir = str(Path(self.data_dir) / slot)
        return proc

    def add_worker(self, port: int | None = None, data_dir: str | None = None, name: str | None = None) -> Proc:
        """Start a worker. Its name (default: the first free ``worker-<i>``) is its identity and names its
        data directory, so a worker started again under its name comes back with its replicas."""
        if name is None:  # a new node, never one this cluster ran before (restart one by passing its name)
            used = {p.name for p in self.procs if p.role == "worker"}
            name = next(f"worker-{i}" for i in range(len(self.procs) + 1) if f"worker-{i}" not in used)
        port = port or free_port_block(self.host, 1)
        addr = f"{self.host}:{port}"
        data_dir = data_dir or str(Path(self.data_dir) / name)
        args = ["worker", "--name", name, "--port", str(port), "--data-dir", data_dir]
        proc = self._spawn("worker", args, name)
        proc.addr = addr
        proc.data_dir = data_dir
        proc.name = name
        self.save()
        return proc

    def worker_procs(self) -> list[Proc]:
        return [p for p in self.procs if p.role == "worker" and p.popen.poll() is None]

    def members(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        return ctl(self.config(), "members", timeout=timeout)["members"]

    def alive_workers(self) -> list[dict[str, Any]]:
        try:
            return [m for m in self.members() if m["state"] == "alive" and m["role"] == "worker"]
        except RpcError:
            return []

    def _joined(self) -> set[str]:
        """Addresses of the workers started here that have joined since they were started."""
        started = {p.addr: p.started for p in self.procs if p.role == "worker"}
        return {m["data_addr"] for m in self.alive_workers()
                if m.get("data_addr") in started and float(m.get("joined_at", 0.0)) >= started[m["data_addr"]] - 0.2}

    def wait_ready(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        respawns = 3
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.popen.poll() is not None]
            for p in [p for p in dead if p.role == "worker" and respawns and _port_taken(p)]:
                # Its port was taken between choosing and binding it: the same worker, a new port.
                respawns -= 1
                self.procs.remove(p)
                self.add_worker(data_dir=p.data_dir or None, name=p.name or None)
                dead.remove(p)
            if dead:
                p = dead[0]
                raise RuntimeError(f"{p.role} exited with {p.popen.returncode}; see {p.log_path}:\n{_tail(p.log_path)}")
            # Only members that the workers started here joined as count: a coordinator that
            # restored its member list from disk still lists the previous run's incarnations as alive
            # until they are replaced or time out, at the same addresses when a worker is restarted
            # on its port (counted, they made a restarted cluster "ready" before any worker joined).
            if len(self._joined()) >= n:
                return
            time.sleep(0.1)  # polling the cluster from outside; there is no event to wait on
        # Say which workers never showed up, and how far each got, so a slow start explains itself.
        joined = self._joined()
        missing = [p for p in self.procs if p.role == "worker" and p.addr not in joined]
        why = "".join(f"\n--- {p.name or p.addr} (not alive at the coordinator), {p.log_path}:\n{_tail(p.log_path, 8)}"
                      for p in missing[:3])
        raise TimeoutError(f"cluster not ready within {timeout}s: {len(missing)} worker(s) missing{why}")

    def ctl(self, name: str, timeout: float | None = None, **args: Any) -> Any:
        return ctl(self.config(), name, timeout=timeout, **args)

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        try:
            proc.popen.send_signal(sig)
        except ProcessLookupError:
            pass
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=5)

    def stop(self, grace: float = 5.0) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                try:
                    p.popen.send_signal(signal.SIGCONT)  # a SIGSTOPped process cannot act on SIGTERM
                    p.popen.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=5)
        state = Path(self.data_dir) / STATE_FILE
        state.unlink(missing_ok=True)
        from common import security  # noqa: PLC0415

        if security.DEFAULT_CLIENT is not None and str(security.DEFAULT_CLIENT.directory) == self.curve_dir:
            security.DEFAULT_CLIENT = None

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def save(self) -> None:
        state = {
            "coordinator": self.coordinator,
            "standby": self.standby_addr,
            "data_dir": self.data_dir,
            "curve_dir": self.curve_dir,  # clients of this data dir find the keys here ("" = --insecure)
            "procs": [{"role": p.role, "pid": p.popen.pid, "addr": p.addr, "name": p.name,
                       **_recorded_identity(p.popen)} for p in self.procs],
        }
        (Path(self.data_dir) / STATE_FILE).write_text(json.dumps(state, indent=2))


def env_insecure() -> bool:
    """IDUNNO_INSECURE=1: the same explicit choice as --insecure, for every process of a run."""
    return os.environ.get("IDUNNO_INSECURE", "").strip().lower() in ("1", "true", "yes", "on")


COORD_SLOTS = ("coord-0", "coord-1")  # data directories of the primary slot and the standby slot
# What `up` leaves in its data directory; `up --fresh` / `down --purge` remove these and nothing else.
_CLUSTER_ENTRIES = re.compile(r"(coord-[\w.-]+|coordinator-\d+|worker-[\w.-]+|logs|" + re.escape(STATE_FILE) + "|"
                              + re.escape(PRIMARY_HINT_FILE) + ")")
# Kept by a wipe: the cluster's CURVE keys are its identity, not its state (clients hold copies).
_KEPT_ENTRIES = {"keys"}


def cluster_entries(data_dir: str) -> list[Path]:
    """The cluster's own entries in ``data_dir``. Raises ValueError, naming them, if the directory
    holds anything else: a wipe must never reach files that are not clearly the cluster's."""
    root = Path(data_dir)
    if not root.exists():
        return []
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    entries, strangers = [], []
    for e in sorted(root.iterdir()):
        if e.name in _KEPT_ENTRIES and e.is_dir():
            continue
        is_file_entry = e.name in (STATE_FILE, PRIMARY_HINT_FILE)
        ours = _CLUSTER_ENTRIES.fullmatch(e.name) and (e.is_dir() and not e.is_symlink()) != is_file_entry
        (entries if ours else strangers).append(e)
    if strangers:
        shown = ", ".join(e.name for e in strangers[:5]) + (" ..." if len(strangers) > 5 else "")
        raise ValueError(f"refusing to wipe {root}: it holds entries that are not an IDunno cluster's "
                         f"({shown}); remove them or choose another --data-dir")
    return entries


def purge_data_dir(data_dir: str) -> int:
    """Delete a stopped local cluster's state (coordinator and worker directories, logs); return how
    many entries were removed. Nothing is removed if anything else is in the directory."""
    entries = cluster_entries(data_dir)
    for e in entries:
        if e.is_dir():
            shutil.rmtree(e)
        else:
            e.unlink()
    return len(entries)


def existing_workers(data_dir: str) -> list[str]:
    """Names of the worker data directories an earlier `up` left in ``data_dir``."""
    root = Path(data_dir)
    if not root.is_dir():
        return []
    return sorted((e.name for e in root.iterdir() if re.fullmatch(r"worker-\d+", e.name) and e.is_dir()),
                  key=lambda n: int(n.split("-")[1]))


def _port_taken(proc: Proc) -> bool:
    try:
        return "Address already in use" in Path(proc.log_path).read_text(errors="replace")
    except OSError:
        return False


def _tail(path: str, lines: int = 15) -> str:
    """The end of a daemon's log, so a start-up failure explains itself where it is reported."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def load_state(data_dir: str) -> dict[str, Any] | None:
    return read_cluster_state(data_dir)


def proc_identity(pid: int) -> dict[str, Any] | None:
    """What tells a process apart from a later one with the same pid: its start time (clock ticks
    after boot, field 22 of ``/proc/PID/stat``) and its command line. None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        fields = stat[stat.rindex(b")") + 2:].split()  # the name in (...) may hold spaces
        start = int(fields[19])
    except (OSError, ValueError, IndexError):
        return None
    if fields[0] == b"Z":
        return None  # exited (a zombie not reaped yet): nothing left to stop
    return {"start": start, "cmdline": [a.decode(errors="surrogateescape") for a in cmdline.split(b"\0")[:-1]]}


def _recorded_identity(popen: subprocess.Popen) -> dict[str, Any]:
    """What `up` records of a process it started: its start time, and the command line it was given.

    The command line is the argv we passed, not /proc's: right after spawn the kernel may not have
    set up the new program's arguments yet (the parent resumes mid-exec), and /proc shows none.
    """
    ident = proc_identity(popen.pid)
    if ident is None or not isinstance(popen.args, (list, tuple)):
        return {}  # exited already, or a shell string: nothing `down` could verify
    return {"start": ident["start"], "cmdline": [os.fsdecode(a) for a in popen.args]}


def _warn(message: str) -> None:
    print(f"idunno: {message}", file=sys.stderr)


class _Target:
    """A verified process to stop: through a pidfd where the kernel has them, so that the process
    checked is the process signalled even if it exits and its pid is reused in between."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self.fd = os.pidfd_open(pid)
            except OSError:
                self.fd = None

    def signal(self, sig: int) -> bool:
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
            else:
                os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def wait(self, timeout: float) -> bool:
        """True once the process has exited (within ``timeout`` seconds)."""
        if self.fd is not None:
            return bool(select.select([self.fd], [], [], max(0.0, timeout))[0])  # readable on exit
        deadline = time.monotonic() + timeout
        while _exists(self.pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)  # no pidfd: polling another process's existence is all there is
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _settled_identity(pid: int, rec: dict[str, Any], settle: float = 3.0) -> dict[str, Any] | None:
    """``proc_identity(pid)``, re-read for up to ``settle`` seconds while it shows the recorded start
    time but another command line: a process caught between fork and exec (a cluster being started
    while `down` runs, on a busy machine) shows its parent's arguments, or none, for a moment."""
    deadline = time.monotonic() + settle
    while True:
        now = proc_identity(pid)
        if (now is None or now["start"] != rec.get("start") or now["cmdline"] == rec.get("cmdline")
                or time.monotonic() > deadline):
            return now
        time.sleep(0.05)  # polling /proc: the kernel gives no event for "exec finished"


def stop_from_state(data_dir: str, grace: float = 5.0, warn: Callable[[str], None] = _warn) -> int:
    """``idunno down``: stop every process recorded by ``idunno up``; return how many were stopped.

    A pid is signalled only if it is still the process that was recorded (same start time and
    command line): after a reboot or a crash the pid may belong to something else by now.
    """
    state = load_state(data_dir)
    if state is None:
        return 0
    targets: list[_Target] = []
    for rec in state.get("procs", []):
        pid, role = rec.get("pid"), rec.get("role", "process")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
            warn(f"{STATE_FILE} lists an invalid pid {pid!r:.40}; ignored")
            continue
        target = _Target(pid)
        now = _settled_identity(pid, rec)
        if now is None:
            target.close()
            continue  # already gone
        if "start" not in rec or "cmdline" not in rec:
            warn(f"pid {pid} ({role}): {STATE_FILE} does not record its start time and command line, "
                 f"so it cannot be told from an unrelated process; not signalled")
        elif now["start"] != rec["start"] or now["cmdline"] != rec["cmdline"]:
            warn(f"pid {pid} ({role}) is no longer the process `idunno up` started (it exited and the pid "
                 f"was reused by: {' '.join(now['cmdline'])[:80] or '?'}); not signalled")
        elif target.signal(signal.SIGCONT) and target.signal(signal.SIGTERM):
            targets.append(target)
            continue
        target.close()
    deadline = time.monotonic() + grace
    for target in targets:
        if not target.wait(deadline - time.monotonic()):
            target.signal(signal.SIGKILL)
        target.close()
    (Path(data_dir) / STATE_FILE).unlink(missing_ok=True)
    return len(targets)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours still "exists": reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
