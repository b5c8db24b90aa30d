"""SDFS client: metadata calls to the master (the coordinator) and chunked, pipelined transfers to nodes.

Used by the CLI, the worker shell, workers (input fetch, re-replication) and tests. Memory stays
bounded by ``transfer_window`` chunks per stream whatever the file size: a 1 GB put is read from
disk chunk by chunk, and a get is written chunk by chunk to a temp file that is renamed at the end.

This module holds the client's API and its conversations with the master (plan, replace targets,
commit, retry; locate, report bad replicas); the data plane lives in its own parts:
``sdfs/upload.py`` (pipelined writes to replica targets), ``sdfs/download.py`` (verified reads of
one replica) and ``sdfs/channels.py`` (one socket per storage node).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import zmq

from common.commands import MAX_INT
from common.config import Config
from common.protocol import (
    Delete,
    ErrorCode,
    ListFiles,
    Locate,
    Located,
    Ok,
    PutBegin,
    PutCommit,
    PutPlan,
    PutReplace,
    ReportBad,
    StoreList,
    decode,
)
from common.rpc import RpcClient, RpcError, Unavailable, next_req
from sdfs.channels import DataChannels
from sdfs.download import PartialWriter, current_umask, publish, read_replica
from sdfs.errors import SdfsError
from sdfs.names import validate_name
from sdfs.store import file_checksum
from sdfs.upload import STRAGGLER_GRACE, PutGroup, Stream, UploadPipeline

log = logging.getLogger("idunno.sdfs.client")

# Re-exported: callers import these from here.
__all__ = ["STRAGGLER_GRACE", "SdfsClient", "SdfsError", "current_umask"]

PUT_ATTEMPTS = 4  # a put batch is tried this often (with back-off) before its failures are reported
PUT_BACKOFF = 0.5  # seconds before the first retry, doubling (at most 5 s)
MAX_REPLACEMENT_ROUNDS = 3  # pipeline recovery: new targets asked for at most this often per try


class SdfsClient:
    """put / get / ls / delete / store for the CLI, workers and tests (see the module docstring)."""

    def __init__(self, cfg: Config, coordinators: list[str] | None = None, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.rpc = RpcClient(coordinators or cfg.coordinators, cfg, self.ctx)
        self.channels = DataChannels(cfg, self.ctx)

    def close(self) -> None:
        self.rpc.close()
        self.channels.close()

    def __enter__(self) -> SdfsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- put -----------------------------------------------------------------------------------
    def put(self, local: str | os.PathLike[str], name: str) -> int:
        return self.put_many([(str(local), name)])[name]

    def put_many(self, items: Iterable[tuple[str, str]], batch: int = 64) -> dict[str, int]:
        """Upload many files with one metadata round trip per batch and pipelined transfers."""
        items = list(items)
        result: dict[str, int] = {}
        for i in range(0, len(items), batch):
            result.update(self._put_batch(items[i : i + batch]))
        return result

    def _put_batch(self, items: list[tuple[str, str]]) -> dict[str, int]:
        """Put a batch, retrying what failed with back-off; raise with every file's reason if some never made it."""
        files = []
        for local, name in items:
            validate_name(name, self.cfg.max_name_len)
            if not os.path.isfile(local):
                raise SdfsError(f"local file not found: {local}")
            files.append({"name": name, "size": os.path.getsize(local), "checksum": file_checksum(local)})
        locals_ = {f["name"]: local for (local, _), f in zip(items, files, strict=True)}
        done: dict[str, int] = {}
        todo = files
        why: dict[str, str] = {}
        for attempt in range(PUT_ATTEMPTS):
            if attempt:
                # A transient failure (targets busy or dying, the coordinator failing over): back off, retry.
                time.sleep(min(PUT_BACKOFF * 2 ** (attempt - 1), 5.0))
                log.info("retrying the put of %d file(s) (attempt %d): %s", len(todo), attempt + 1,
                         "; ".join(f"{n}: {w}" for n, w in list(why.items())[:3]))
            try:
                versions, why = self._put_once(todo, locals_)
            except RpcError as exc:
                versions, why = {}, {f["name"]: str(exc) for f in todo}
            done.update(versions)
            todo = [f for f in todo if f["name"] in why]
            if not todo:
                break
        if todo:
            raise SdfsError("put failed: " + "; ".join(f"{n}: {w}" for n, w in why.items()))
        return done

    def _put_once(self, files: list[dict[str, Any]], locals_: dict[str, str]) -> tuple[dict[str, int], dict[str, str]]:
        """One try: plan, stream (replacing failed targets), commit. Returns (versions, {name: why failed})."""
        plan = self.rpc.call(PutBegin(0, files))
        if not isinstance(plan, PutPlan):
            raise SdfsError(f"unexpected reply {plan.TYPE}")
        by_name = {f["name"]: f for f in files}
        groups: dict[str, PutGroup] = {}
        for p in plan.plans:
            g = PutGroup(p["put_id"], p["name"], p["version"], int(p["quorum"]), grant=str(p.get("grant") or ""))
            g.add(locals_[p["name"]], by_name[p["name"]], p["replicas"])
            groups[g.put_id] = g
        self._upload_with_recovery(groups, lambda g: (locals_[g.name], by_name[g.name]))
        return self._commit(groups)

    def _upload_with_recovery(self, groups: dict[str, PutGroup],
                              source: Callable[[PutGroup], tuple[str, dict[str, Any]]]) -> None:
        """Run the streams; while some version is short of its quorum, ask for new targets and run those."""
        streams = [st for g in groups.values() for st in g.streams]
        for round_ in range(MAX_REPLACEMENT_ROUNDS + 1):
            self._run_uploads(streams, groups)
            short = [g for g in groups.values() if g.stored < g.quorum]
            if not short or round_ == MAX_REPLACEMENT_ROUNDS:
                return
            # Pipeline recovery (as HDFS): a target that failed or did not answer in time is replaced
            # by another live node; the version commits once W replicas hold it, and the master brings
            # it to N in the background.
            reply = self.rpc.call(PutReplace(0, [
                {"put_id": g.put_id, "exclude": sorted(g.tried), "count": g.quorum - g.stored} for g in short
            ]))
            if not isinstance(reply, PutPlan):
                raise SdfsError(f"unexpected reply {reply.TYPE}")
            streams = []
            for p in reply.plans:
                g = groups[p["put_id"]]
                if p["replicas"]:
                    log.info("replacing failed target(s) of %s v%d with %s", g.name, g.version,
                             ", ".join(r["addr"] for r in p["replicas"]))
                streams += g.add(*source(g), p["replicas"])
            if not streams:
                return  # no live node left to try

    def _commit(self, groups: dict[str, PutGroup]) -> tuple[dict[str, int], dict[str, str]]:
        """Tell the master where each version was stored; return (versions, {name: why failed})."""
        reply = self.rpc.call(PutCommit(0, [{"put_id": g.put_id, "stored": g.stored_on()} for g in groups.values()]))
        failed = (reply.data or {}).get("failed", {}) if isinstance(reply, Ok) else {}
        why: dict[str, str] = {}
        for name, reason in failed.items():
            g = next((g for g in groups.values() if g.name == name), None)
            errors = "; ".join(f"{st.addr}: {st.error}" for st in (g.streams if g else []) if not st.ok and st.error)
            why[name] = f"{reason}{f' ({errors})' if errors else ''}"
        return {g.name: g.version for g in groups.values() if g.name not in why}, why

    def _run_uploads(self, streams: list[Stream], groups: dict[str, PutGroup], max_active: int = 32) -> None:
        UploadPipeline(self.cfg, self.channels, streams, groups, max_active).run()

    # -- get -----------------------------------------------------------------------------------
    def locate(self, name: str, count: int = 1, wait: float = 0.0) -> list[dict[str, Any]]:
        """The newest ``count`` versions of ``name`` with their live replicas. ``wait``: seconds to
        keep asking while the coordinator knows the file but none of its replica holders is alive
        yet (a cluster just started: the workers are still joining, as HDFS's safe mode), with
        backoff; the same error after that."""
        validate_name(name, self.cfg.max_name_len)
        started = time.monotonic()
        deadline = started + max(0.0, wait)
        pause = 0.1
        asked = 0
        while True:
            try:
                reply = self.rpc.call(Locate(0, name, count))
                break
            except Unavailable:
                raise  # no coordinator answered: RpcClient has retried already
            except RpcError as exc:
                asked += 1
                left = deadline - time.monotonic()
                if exc.code != ErrorCode.UNAVAILABLE:
                    raise
                if left <= 0:
                    if asked == 1:
                        raise
                    took = time.monotonic() - started
                    raise RpcError(exc.code, f"{exc} (asked {asked} times in {took:.1f} s)") from None
                log.info("%s: %s; asking again (up to %.1f s more)", name, exc, left)
                time.sleep(min(pause, left))
                pause = min(pause * 2, 1.0)
        if not isinstance(reply, Located):
            raise SdfsError(f"unexpected reply {reply.TYPE}")
        return reply.versions

    def get(self, name: str, local: str | os.PathLike[str], wait: float | None = None) -> dict[str, Any]:
        """Write the newest version to ``local``; ``wait`` (default ``request_timeout``): see :meth:`locate`."""
        versions = self.locate(name, 1, wait=self.cfg.request_timeout if wait is None else wait)
        v = versions[0]
        _write_file(local, lambda out: self._download(name, v, out))
        return v

    def get_bytes(self, name: str, version: dict[str, Any] | None = None) -> bytes:
        v = version or self.locate(name, 1, wait=self.cfg.request_timeout)[0]
        buf = io.BytesIO()
        self._download(name, v, buf)
        return buf.getvalue()

    def get_versions(self, name: str, count: int, local: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Write the newest ``count`` versions, newest first, each behind a delimiter line."""
        if not 1 <= count <= MAX_INT:
            raise SdfsError(f"number of versions must be 1..{MAX_INT}")
        versions = self.locate(name, count, wait=self.cfg.request_timeout)

        def write(out: IO[bytes]) -> None:
            for v in versions:
                when = dt.datetime.fromtimestamp(v["mtime"], dt.UTC).isoformat(timespec="seconds")
                out.write(f"==> sdfs:{name} version {v['version']} size {v['size']} bytes time {when} <==\n".encode())
                self._download(name, v, out)
                out.write(b"\n")

        _write_file(local, write)
        return versions

    def _download(self, name: str, v: dict[str, Any], out: IO[bytes]) -> None:
        """Read one version from the first of its replicas that serves it whole and intact."""
        errors = []
        replicas = list(v["replicas"])
        if not replicas:
            raise SdfsError(f"{name} v{v['version']}: no live replica")
        for r in replicas:
            start = out.tell()
            try:
                read_replica(self.cfg, self.channels, r["addr"], name, v["version"], v["size"], v["checksum"], out)
                return
            except SdfsError as exc:
                errors.append(f"{r['addr']}: {exc}")
                log.warning("read of %s v%d from %s failed: %s", name, v["version"], r["addr"], exc)
                if exc.corrupt:  # a timeout may be our own network's fault: only bad data is reported
                    self._report_bad(r["node_id"], name, v["version"])
                out.seek(start)
                out.truncate()
        raise SdfsError(f"{name} v{v['version']}: every replica failed ({'; '.join(errors)})")

    def _report_bad(self, node_id: str, name: str, version: int) -> None:
        try:
            self.rpc.call(ReportBad(node_id, name, version), timeout=1.0, retries=1)
        except RpcError as exc:  # reporting is best effort: the read itself already succeeded elsewhere
            log.warning("could not report bad replica of %s v%d on %s: %s", name, version, node_id, exc)

    # -- metadata --------------------------------------------------------------------------------
    def delete(self, name: str) -> Any:
        validate_name(name, self.cfg.max_name_len)
        return self.rpc.call(Delete(0, name)).data  # type: ignore[attr-defined]

    def ls(self, pattern: str = "*") -> list[dict[str, Any]]:
        reply = self.rpc.call(ListFiles(0, pattern))
        return list((reply.data or {}).get("files", []))  # type: ignore[attr-defined]

    def store(self, node_addr: str) -> list[list[Any]]:
        """List the replicas held by one node (its data server address)."""
        sock = self.channels.get(node_addr)
        req = next_req()
        sock.send(StoreList(req).encode())
        deadline = time.monotonic() + self.cfg.request_timeout
        while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000) + 1):
            reply = decode(sock.recv(), self.cfg.max_frame_bytes)
            if getattr(reply, "req", None) == req and isinstance(reply, Ok):
                return list(reply.data["files"])
        self.channels.reset(node_addr)
        raise SdfsError(f"no answer from {node_addr}")

    def pull_replica(self, sources: list[str], name: str, version: int, size: int, checksum: str, store) -> None:
        """Fetch a replica from the first healthy source straight into a LocalStore (re-replication)."""
        errors = []
        for addr in sources:
            partial = store.begin(name, version, size, checksum)
            try:
                writer = PartialWriter(partial)
                read_replica(self.cfg, self.channels, addr, name, version, size, checksum, writer)
                partial.finish()
                return
            except Exception as exc:
                partial.abort()
                errors.append(f"{addr}: {exc}")
        raise SdfsError(f"could not fetch {name} v{version}: {'; '.join(errors)}")


def _write_file(local: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write a download to a temp file next to ``local`` and rename it into place once complete:
    a failed or interrupted get leaves no partial file behind."""
    dest = Path(local)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        publish(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
