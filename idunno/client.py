"""The Python client of an IDunno cluster: jobs, their results as they complete, and SDFS.

    from idunno import Client

    with Client() as client:                      # the cluster `idunno up` started here (./var/cluster.json)
        job = client.submit("resnet50", "data/*.jpg", batch=8)
        for r in job.results():                   # yields each result as it completes
            print(r.input, r.label, r.worker, f"{r.latency:.2f}s")

Every call goes to the primary coordinator and fails over to the standby like the CLI (which is
built on this class). Errors are typed: :class:`ClusterUnavailable` (nobody answers: start a
cluster or say where it is), :class:`NotFound`, :class:`BadRequest`, :class:`WaitTimeout`,
:class:`SdfsFailed`, all subclasses of :class:`IdunnoError`.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.commands import COMMANDS, check_args, with_request_id
from common.config import Config, load_config
from common.protocol import Command, ErrorCode
from common.rpc import RpcClient, RpcError, Unavailable

STATE_FILE = "cluster.json"  # written by `idunno up` into its data directory
PRIMARY_HINT_FILE = "primary.json"  # beside it: the coordinator that last answered as primary (common/rpc.py)
DEFAULT_DATA_DIR = "var"
PROBE_TIMEOUT = 1.0  # for the ZeroMQ greeting of any coordinator, before the first request
NO_CLUSTER_HINT = ("is the cluster running? Start one here with `idunno up --detach`, or say where it is with "
                   "--coordinator HOST:PORT[,STANDBY] (or IDUNNO_COORDINATOR, or Client(coordinator=...))")
TERMINAL = ("done", "cancelled")


class IdunnoError(Exception):
    """Base of every error this client raises."""


class ClusterUnavailable(IdunnoError):
    """No coordinator answered (none running at the addresses, or unreachable)."""


class CommandFailed(IdunnoError):
    """The coordinator refused a command; ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NotFound(CommandFailed):
    """No such job, or no SDFS file matching."""


class BadRequest(CommandFailed):
    """Bad arguments (batch size out of range, unknown model name syntax, ...)."""


class WaitTimeout(IdunnoError, TimeoutError):
    """A job did not finish within the time given to :meth:`Job.wait` / :meth:`Job.results`."""


class SdfsFailed(IdunnoError):
    """An SDFS operation failed (write quorum not reached, no replica readable, bad name, ...)."""


def _command_error(exc: RpcError) -> IdunnoError:
    if isinstance(exc, Unavailable):
        return ClusterUnavailable(f"{exc}; {NO_CLUSTER_HINT}")
    cls = {ErrorCode.NOT_FOUND: NotFound, ErrorCode.BAD_REQUEST: BadRequest}.get(exc.code, CommandFailed)
    return cls(exc.code, str(exc))


def probe_zmq(endpoints: list[str], timeout: float) -> list[str]:
    """Connect to every ``host:port`` at once and wait (at most ``timeout`` in all) for a ZeroMQ peer's
    greeting (it starts with byte 0xFF, sent by libzmq's I/O thread as soon as it accepts). Return []
    when one greeted, else the reason for each: refused in microseconds when nothing listens, and no
    false "alive" from a middlebox that accepts any TCP connection."""
    reasons: dict[str, str] = {}
    sel = selectors.DefaultSelector()
    try:
        for addr in endpoints:
            host, _, port = addr.rpartition(":")
            try:
                # An ASCII name as bytes: a str would be IDNA-encoded, importing the codec (start-up time).
                name = host.encode("ascii") if host.isascii() else host
                family, kind, proto, _, sockaddr = socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)[0]
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                sock.connect_ex(sockaddr)
                sel.register(sock, selectors.EVENT_READ, addr)
            except (OSError, ValueError) as exc:
                reasons[addr] = f"{addr}: {getattr(exc, 'strerror', None) or exc}"
        deadline = time.monotonic() + timeout
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(left):
                sock, addr = key.fileobj, key.data
                try:
                    data = sock.recv(16)  # type: ignore[union-attr]
                except OSError as exc:
                    data, reasons[addr] = b"", f"{addr}: {exc.strerror or exc}"
                if data[:1] == b"\xff":
                    return []
                reasons.setdefault(addr, f"{addr}: not a ZeroMQ endpoint")
                sel.unregister(sock)
                sock.close()  # type: ignore[union-attr]
        for key in list(sel.get_map().values()):
            reasons[key.data] = f"{key.data}: no greeting within {timeout:g}s"
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
    return [reasons[a] for a in endpoints if a in reasons]


def read_cluster_state(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The addresses and pids `idunno up` recorded in ``<data_dir>/cluster.json`` (None if absent)."""
    try:
        return json.loads((Path(data_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def resolve_config(coordinator: str | None = None, standby: str | None = None, *, config: str | None = None,
                   data_dir: str | None = None, curve_dir: str | None = None, role: str | None = None,
                   **overrides: Any) -> Config:
    """Where the cluster is: explicit addresses, else ``IDUNNO_COORDINATOR``/config, else the cluster
    that `idunno up` recorded in the data directory (``IDUNNO_DATA_DIR``, default ./var).

    ``coordinator`` may be ``"host:port,standby-host:port"``. The keys: ``curve_dir`` (or
    ``IDUNNO_CURVE_DIR``/config), else those `idunno up` recorded with the cluster. A daemon passes its
    ``role`` ("coordinator", "worker"): the whole process then uses that role's keys.
    """
    if coordinator and "," in coordinator:
        parts = [a.strip() for a in coordinator.split(",") if a.strip()]
        coordinator, standby = parts[0], (parts[1] if len(parts) > 1 else standby)
    data_dir = data_dir or os.environ.get("IDUNNO_DATA_DIR") or DEFAULT_DATA_DIR
    state = read_cluster_state(data_dir)
    if coordinator is None and "IDUNNO_COORDINATOR" not in os.environ and state:
        coordinator, standby = state["coordinator"], state.get("standby", "")
    if coordinator is not None and standby is None:
        standby = ""  # an explicit single address: no standby unless given
    if (not curve_dir and not os.environ.get("IDUNNO_CURVE_DIR") and state and state.get("curve_dir")
            and (coordinator or os.environ.get("IDUNNO_COORDINATOR")) in (state["coordinator"], state.get("standby"))):
        curve_dir = str(state["curve_dir"])  # the keys `idunno up` made for this cluster
    cfg = load_config(config, coordinator=coordinator, standby=standby, data_dir=data_dir, curve_dir=curve_dir,
                      **overrides)
    if role is not None:
        from common import security  # noqa: PLC0415

        if cfg.curve_dir:
            security.enable(cfg.curve_dir, role)
        elif not cfg.insecure:
            raise ValueError(f"no keys for this {role}: set IDUNNO_CURVE_DIR to the cluster's key directory "
                             f"(`idunno keys init`), or run it plaintext and unauthenticated with --insecure")
    return cfg


def json_safe(data: Any) -> Any:
    """``data`` with every NaN/infinity replaced by None, so ``json.dumps`` writes strict JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def dumps(data: Any, **kw: Any) -> str:
    """Strict JSON (``null``, never ``NaN``)."""
    return json.dumps(json_safe(data), allow_nan=False, default=str, **kw)


@dataclass(frozen=True)
class Result:
    """One input's answer."""

    qid: str
    input: str
    top5: list[tuple[str, float]]
    worker: str
    latency: float  # seconds from dispatch to result
    completed_at: float | None  # wall clock (time.time()) when the coordinator accepted it
    dispatches: int  # times the query was sent to a worker (>1 after a failure or timeout)
    error: str | None
    model: str = ""

    @property
    def index(self) -> int:
        return int(self.qid.rsplit(":", 1)[1])

    @property
    def label(self) -> str | None:
        """Top-1 label (None for an error)."""
        return self.top5[0][0] if self.top5 else None

    @classmethod
    def from_wire(cls, d: dict[str, Any], model: str = "") -> Result:
        return cls(qid=d["qid"], input=d.get("input", ""), top5=[(str(a), float(b)) for a, b in d.get("top5") or []],
                   worker=d.get("worker", ""), latency=float(d.get("latency") or 0.0),
                   completed_at=d.get("completed_at"), dispatches=int(d.get("dispatches") or 1),
                   error=d.get("error"), model=d.get("model") or model)  # a row's model is its job's


class Job:
    """A submitted job (a handle: every method asks the coordinator)."""

    def __init__(self, client: Client, info: dict[str, Any]) -> None:
        self.client = client
        self.id: str = info["job_id"]
        self.model: str = info.get("model", "")
        self.total: int = int(info.get("total", 0))
        self.last_info = info

    def __repr__(self) -> str:
        return f"Job({self.id!r}, model={self.model!r}, total={self.total})"

    def info(self) -> dict[str, Any]:
        """State and progress: ``state``, ``completed``, ``pending``, ``total``, ``started``, ``finished``, ..."""
        found = [j for j in self.client.command("jobs") if j["job_id"] == self.id]
        if not found:
            raise NotFound(ErrorCode.NOT_FOUND, f"no such job {self.id!r}")
        self.last_info = found[0]
        return found[0]

    @property
    def state(self) -> str:
        return self.info()["state"]

    def finished(self) -> bool:
        return self.info().get("finished") is not None

    def wait(self, timeout: float | None = None, poll: float = 0.05) -> dict[str, Any]:
        """Block until the job is finished (done, or cancelled and its in-flight queries back);
        return its final info. Raise :class:`WaitTimeout` after ``timeout`` seconds."""
        deadline = None if timeout is None or timeout <= 0 else time.monotonic() + timeout
        delay = poll
        while True:
            info = self.info()
            if info.get("finished") is not None:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"{self.id} not finished after {timeout:g}s "
                                  f"({info['completed']}/{info['total']} done, state {info['state']})")
            pause = delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
            time.sleep(pause)  # polling the coordinator: the protocol has no job-done push to clients
            delay = min(delay * 1.5, 0.5)

    def results(self, timeout: float | None = None, poll: float = 0.05, page: int = 500) -> Iterator[Result]:
        """Yield every result once, in completion order, as the results come in; stop when the job is
        finished. Resumes from its cursor across a coordinator failover (no gap, no repeat)."""
        deadline = None if timeout is None or timeout <= 0 else time.monotonic() + timeout
        cursor, delay = 0, poll
        while True:
            data = self.client.command("results", job=self.id, after=cursor, limit=page)
            for r in data["results"]:
                yield Result.from_wire(r, self.model)
            cursor = data["next"]
            self.last_info = data["job"]
            if data["results"]:
                delay = poll
                continue
            if data["job"].get("finished") is not None:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"{self.id}: no new result within {timeout:g}s ({cursor}/{self.total} seen)")
            time.sleep(delay)  # polling, as in wait()
            delay = min(delay * 1.5, 0.5)

    def all_results(self) -> list[Result]:
        """Every result so far, by input index (does not wait)."""
        return [Result.from_wire(r, self.model) for r in self.client.command("results", job=self.id)["results"]]

    def rate(self) -> dict[str, Any]:
        """``rate`` (images/s over the window), ``overall``, ``count``, ``duplicates``, ``window``, ``state``."""
        return self.client.command("query_rate", job=self.id)["jobs"][self.id]

    def latency(self) -> dict[str, Any]:
        """Latency and compute time per image: ``{"latency": {avg, std, median, p90, p95, p99}, "compute": ...}``."""
        return self.client.command("query_time", job=self.id)[self.id]

    def cancel(self) -> dict[str, Any]:
        """Drop the pending queries; in-flight ones finish and every result is kept."""
        return self.client.command("cancel", job=self.id)

    def set_batch_size(self, n: int | str, latency_target: float | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"job": self.id, "n": n}
        if latency_target is not None:
            args["latency_target"] = latency_target
        return self.client.command("set_batch_size", **args)


class Sdfs:
    """SDFS through the client's coordinators: ``put``, ``put_many``, ``get``, ``ls``, ``delete``,
    ``get_versions``. Errors are :class:`SdfsFailed` (or :class:`ClusterUnavailable`)."""

    def __init__(self, client: Client) -> None:
        from sdfs.client import SdfsClient  # noqa: PLC0415

        self._c = SdfsClient(client.cfg)

    def _call(self, fn: Any, *args: Any) -> Any:
        from sdfs.client import SdfsError  # noqa: PLC0415
        from sdfs.names import BadName  # noqa: PLC0415

        try:
            return fn(*args)
        except RpcError as exc:
            err = _command_error(exc)
            if isinstance(err, ClusterUnavailable):
                raise err from None
            raise SdfsFailed(str(exc)) from None
        except (SdfsError, BadName) as exc:
            raise SdfsFailed(str(exc)) from None

    def put(self, local: str | os.PathLike[str], name: str) -> int:
        """Insert or update ``name`` from a local file; return the new version number."""
        return self._call(self._c.put, local, name)

    def put_many(self, items: list[tuple[str, str]]) -> dict[str, int]:
        """``[(local, name), ...]`` in batches with pipelined transfers; return ``{name: version}``."""
        return self._call(self._c.put_many, items)

    def get(self, name: str, local: str | os.PathLike[str]) -> dict[str, Any]:
        """Fetch the newest version (checksum-verified) into ``local``; return its version record."""
        return self._call(self._c.get, name, local)

    def read(self, name: str) -> bytes:
        return self._call(self._c.get_bytes, name)

    def ls(self, pattern: str = "") -> list[dict[str, Any]]:
        """Files matching a name, glob or prefix, with their versions and replicas."""
        return self._call(self._c.ls, pattern)

    def delete(self, name: str) -> int:
        """Delete every version; return how many there were."""
        return int(self._call(self._c.delete, name)["deleted_versions"])

    def get_versions(self, name: str, k: int, local: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """The newest ``k`` versions into one file, each behind a ``==> sdfs:...`` header line."""
        return self._call(self._c.get_versions, name, k, local)

    def store(self, node_addr: str) -> list[list[Any]]:
        """What one node stores: ``[name, version, size, checksum, mtime]`` rows."""
        return self._call(self._c.store, node_addr)

    def close(self) -> None:
        self._c.close()


class Client:
    """A connection to an IDunno cluster.

    ``Client()`` finds the cluster the way the CLI does (``--coordinator``/``IDUNNO_COORDINATOR``, a
    config file, or ``<data_dir>/cluster.json`` from ``idunno up``). Pass ``coordinator="h:p"``
    (and ``standby=``), ``curve_dir=`` for a secured cluster, ``timeout=`` per request.
    """

    def __init__(self, coordinator: str | None = None, standby: str | None = None, *, config: str | None = None,
                 data_dir: str | None = None, curve_dir: str | None = None, timeout: float | None = None,
                 cfg: Config | None = None) -> None:
        self.cfg = cfg or resolve_config(coordinator, standby, config=config, data_dir=data_dir, curve_dir=curve_dir)
        self.timeout = timeout
        self._rpc: RpcClient | None = None
        self._sdfs: Sdfs | None = None
        self._probed = False

    # -- plumbing ---------------------------------------------------------------------------------------
    def _probe(self, what: str) -> None:
        """Fail fast when no coordinator is there (the common "no cluster" case), instead of waiting out
        a request's retries: see :func:`probe_zmq`."""
        reasons = probe_zmq(self.cfg.coordinators, PROBE_TIMEOUT)
        if reasons:
            raise ClusterUnavailable(f"{what}: no coordinator answers ({'; '.join(reasons)}); {NO_CLUSTER_HINT}")

    def command(self, name: str, timeout: float | None = None, **args: Any) -> Any:
        """Run one coordinator command (see `idunno ctl help`) and return its data."""
        if name in COMMANDS:
            try:  # every argument's type and range, before anything is sent (the coordinator checks too)
                args = check_args(name, dict(args))
            except ValueError as exc:
                raise BadRequest(ErrorCode.BAD_REQUEST, f"{name}: {exc}") from None
        if not self._probed:
            self._probe(name)
            self._probed = True
        if self._rpc is None:
            self._rpc = RpcClient(self.cfg.coordinators, self.cfg,
                                  hint_file=Path(self.cfg.data_dir) / PRIMARY_HINT_FILE)
        try:
            reply = self._rpc.call(Command(0, name, with_request_id(name, args)), timeout=timeout or self.timeout)
        except RpcError as exc:
            raise _command_error(exc) from None
        return reply.data  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._rpc is not None:
            self._rpc.close()
            self._rpc = None
        if self._sdfs is not None:
            self._sdfs.close()
            self._sdfs = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- jobs --------------------------------------------------------------------------------------------
    def submit(self, model: str, inputs: str, batch: int | str | None = None, weight: float = 1.0,
               start: bool = True, latency_target: float | None = None, weights: str = "") -> Job:
        """Run ``model`` (any torchvision classifier, or ``noop``) over the SDFS files matching ``inputs``
        (a glob or prefix). ``start=False`` queues the job until :meth:`start` (unless others run).
        ``batch="auto"`` sizes each batch so its compute stays under ``latency_target`` seconds.
        ``weights``: an SDFS checkpoint the job runs with (as ``ctl submit --weights``; docs/models.md)."""
        args: dict[str, Any] = {"model": model, "inputs": inputs, "weight": weight, "start": start}
        if weights:
            args["weights"] = weights
        if batch:
            args["batch"] = batch
        if latency_target is not None:
            args["latency_target"] = latency_target
        return Job(self, self.command("submit", **args))

    def job(self, job_id: str) -> Job:
        """A handle on an existing job."""
        found = [j for j in self.command("jobs") if j["job_id"] == job_id]
        if not found:
            raise NotFound(ErrorCode.NOT_FOUND, f"no such job {job_id!r}")
        return Job(self, found[0])

    def jobs(self) -> list[Job]:
        return [Job(self, j) for j in self.command("jobs")]

    def start(self) -> list[str]:
        """Start every queued job; return their ids."""
        return self.command("start")["started"]

    def members(self) -> list[dict[str, Any]]:
        return self.command("members")["members"]

    # -- SDFS ---------------------------------------------------------------------------------------------
    @property
    def sdfs(self) -> Sdfs:
        if self._sdfs is None:
            if not self._probed:
                self._probe("sdfs")
                self._probed = True
            self._sdfs = Sdfs(self)
        return self._sdfs
