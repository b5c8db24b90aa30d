"""SDFS client: metadata calls to the master (the coordinator) and chunked, pipelined transfers to nodes.

Used by the CLI, the worker shell, workers (input fetch, re-replication) and tests. Memory stays
bounded by ``transfer_window`` chunks per stream whatever the file size: a 1 GB put is read from
disk chunk by chunk, and a get is written chunk by chunk to a temp file that is renamed at the end.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zmq

from common.commands import MAX_INT
from common.config import Config
from common.protocol import (
    ChunkData,
    Delete,
    Error,
    ListFiles,
    Locate,
    Located,
    Ok,
    PutBegin,
    PutCommit,
    PutPlan,
    ReadChunk,
    ReportBad,
    StoreList,
    WriteAck,
    WriteChunk,
    decode,
)
from common.rpc import RpcClient, RpcError, next_req
from common.transport import make_socket, tcp
from sdfs.names import validate_name
from sdfs.store import file_checksum, new_hasher

log = logging.getLogger("idunno.sdfs.client")


class SdfsError(RuntimeError):
    def __init__(self, message: str, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt  # the replica answered with data that fails its checksum


@dataclass
class _Stream:
    """One file going to one replica."""

    path: str
    name: str
    version: int
    size: int
    checksum: str
    addr: str
    node_id: str
    fh: IO[bytes] | None = None
    next_offset: int = 0
    inflight: set[int] = field(default_factory=set)
    done: bool = False
    ok: bool = False
    error: str = ""
    last_progress: float = 0.0
    started: bool = False


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (no window for other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: str, dest: Path) -> None:
    """Move a finished download into place with the mode a new file gets (mkstemp made it 0600)."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, dest)


class SdfsClient:
    def __init__(self, cfg: Config, coordinators: list[str] | None = None, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.rpc = RpcClient(coordinators or cfg.coordinators, cfg, self.ctx)
        self._data_socks: dict[str, zmq.Socket] = {}

    def close(self) -> None:
        self.rpc.close()
        for s in self._data_socks.values():
            s.close(0)
        self._data_socks.clear()

    def __enter__(self) -> SdfsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _data(self, addr: str) -> zmq.Socket:
        sock = self._data_socks.get(addr)
        if sock is None:
            sock = make_socket(self.ctx, zmq.DEALER, self.cfg.max_frame_bytes)
            sock.connect(tcp(addr))
            self._data_socks[addr] = sock
        return sock

    def _reset_data(self, addr: str) -> None:
        # Replies to abandoned requests may still arrive: a fresh socket cannot see them.
        sock = self._data_socks.pop(addr, None)
        if sock is not None:
            sock.close(0)

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
        files = []
        for local, name in items:
            validate_name(name, self.cfg.max_name_len)
            if not os.path.isfile(local):
                raise SdfsError(f"local file not found: {local}")
            files.append({"name": name, "size": os.path.getsize(local), "checksum": file_checksum(local)})
        plan = self.rpc.call(PutBegin(0, files))
        if not isinstance(plan, PutPlan):
            raise SdfsError(f"unexpected reply {plan.TYPE}")
        streams: list[_Stream] = []
        for (local, _), f, p in zip(items, files, plan.plans, strict=True):
            for r in p["replicas"]:
                streams.append(
                    _Stream(local, p["name"], p["version"], f["size"], f["checksum"], r["addr"], r["node_id"])
                )
        self._run_uploads(streams)
        commits = []
        for p in plan.plans:
            stored = [s.node_id for s in streams if s.name == p["name"] and s.version == p["version"] and s.ok]
            commits.append({"put_id": p["put_id"], "stored": stored})
        reply = self.rpc.call(PutCommit(0, commits))
        failed = (reply.data or {}).get("failed", {}) if isinstance(reply, Ok) else {}
        if failed:
            errors = {s.name: s.error for s in streams if not s.ok and s.error}
            detail = "; ".join(f"{n}: {why} {errors.get(n, '')}".strip() for n, why in failed.items())
            raise SdfsError(f"put failed: {detail}")
        return {p["name"]: p["version"] for p in plan.plans}

    def _run_uploads(self, streams: list[_Stream], max_active: int = 32) -> None:
        by_req: dict[int, _Stream] = {}
        pending = list(streams)
        active: list[_Stream] = []
        poller = zmq.Poller()
        polled: set[str] = set()
        try:
            while pending or active:
                while pending and len(active) < max_active:
                    s = pending.pop(0)
                    s.last_progress = time.monotonic()
                    active.append(s)
                    sock = self._data(s.addr)
                    if s.addr not in polled:
                        poller.register(sock, zmq.POLLIN)
                        polled.add(s.addr)
                for s in active:
                    self._pump(s, by_req)
                now = time.monotonic()
                for s in active:
                    if not s.done and now - s.last_progress > self.cfg.transfer_timeout:
                        self._finish(s, False, f"no answer from {s.addr}")
                        self._reset_data(s.addr)
                        polled.discard(s.addr)
                        poller = zmq.Poller()
                        for a in polled:
                            poller.register(self._data_socks[a], zmq.POLLIN)
                active = [s for s in active if not s.done]
                if not active:
                    continue
                for sock, _ in poller.poll(100):
                    while True:
                        try:
                            frame = sock.recv(flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            ack = decode(frame, self.cfg.max_frame_bytes)
                        except Exception:
                            continue
                        s = by_req.pop(getattr(ack, "req", -1), None)
                        if s is None or s.done:
                            continue
                        s.inflight.discard(ack.req)  # type: ignore[attr-defined]
                        s.last_progress = time.monotonic()
                        if isinstance(ack, WriteAck):
                            if not ack.ok:
                                self._finish(s, False, ack.error)
                            elif ack.done:
                                self._finish(s, True, "")
                        elif isinstance(ack, Error):
                            self._finish(s, False, ack.message)
        finally:
            for s in streams:
                if s.fh is not None:
                    s.fh.close()

    def _finish(self, s: _Stream, ok: bool, error: str) -> None:
        s.done, s.ok, s.error = True, ok, error
        if s.fh is not None:
            s.fh.close()
            s.fh = None
        if not ok:
            log.warning("upload of %s v%d to %s failed: %s", s.name, s.version, s.addr, error)

    def _pump(self, s: _Stream, by_req: dict[int, _Stream]) -> None:
        if s.done:
            return
        if s.fh is None:
            s.fh = open(s.path, "rb")  # noqa: SIM115 - closed by _finish / _run_uploads
        sock = self._data(s.addr)
        while len(s.inflight) < self.cfg.transfer_window and (s.next_offset < s.size or not s.started):
            data = s.fh.read(self.cfg.chunk_bytes)
            last = s.next_offset + len(data) >= s.size
            req = next_req()
            msg = WriteChunk(req, s.name, s.version, s.next_offset, data, s.size, s.checksum, last)
            try:
                sock.send(msg.encode(), flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self._finish(s, False, str(exc))
                return
            s.started = True
            s.inflight.add(req)
            by_req[req] = s
            s.next_offset += len(data)
            if last:
                break

    # -- get -----------------------------------------------------------------------------------
    def locate(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        validate_name(name, self.cfg.max_name_len)
        reply = self.rpc.call(Locate(0, name, count))
        if not isinstance(reply, Located):
            raise SdfsError(f"unexpected reply {reply.TYPE}")
        return reply.versions

    def get(self, name: str, local: str | os.PathLike[str]) -> dict[str, Any]:
        versions = self.locate(name, 1)
        v = versions[0]
        dest = Path(local)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                self._download(name, v, out)
            _publish(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return v

    def get_bytes(self, name: str, version: dict[str, Any] | None = None) -> bytes:
        v = version or self.locate(name, 1)[0]
        buf = io.BytesIO()
        self._download(name, v, buf)
        return buf.getvalue()

    def get_versions(self, name: str, count: int, local: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Write the newest ``count`` versions, newest first, each behind a delimiter line."""
        if not 1 <= count <= MAX_INT:
            raise SdfsError(f"number of versions must be 1..{MAX_INT}")
        versions = self.locate(name, count)
        dest = Path(local)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                for v in versions:
                    when = dt.datetime.fromtimestamp(v["mtime"], dt.UTC).isoformat(timespec="seconds")
                    out.write(
                        f"==> sdfs:{name} version {v['version']} size {v['size']} bytes time {when} <==\n".encode()
                    )
                    self._download(name, v, out)
                    out.write(b"\n")
            _publish(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return versions

    def _download(self, name: str, v: dict[str, Any], out: IO[bytes]) -> None:
        errors = []
        replicas = list(v["replicas"])
        if not replicas:
            raise SdfsError(f"{name} v{v['version']}: no live replica")
        for r in replicas:
            start = out.tell()
            try:
                self._download_from(r["addr"], name, v["version"], v["size"], v["checksum"], out)
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

    def _download_from(self, addr: str, name: str, version: int, size: int, checksum: str, out: IO[bytes]) -> None:
        sock = self._data(addr)
        hasher = new_hasher()
        chunk = self.cfg.chunk_bytes
        offsets = list(range(0, size, chunk)) or [0]
        inflight: dict[int, int] = {}  # req -> offset
        received: dict[int, bytes] = {}
        next_send = 0
        next_write = 0
        # A dead or unreachable source never answers at all: give up on it sooner than on a slow one.
        deadline = time.monotonic() + min(self.cfg.request_timeout, self.cfg.transfer_timeout)
        while next_write < len(offsets):
            while next_send < len(offsets) and len(inflight) + len(received) < self.cfg.transfer_window:
                req = next_req()
                sock.send(ReadChunk(req, name, version, offsets[next_send], chunk).encode())
                inflight[req] = offsets[next_send]
                next_send += 1
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                self._reset_data(addr)
                raise SdfsError("timed out")
            try:
                reply = decode(sock.recv(), self.cfg.max_frame_bytes)
            except Exception as exc:
                self._reset_data(addr)
                raise SdfsError(f"bad reply: {exc}") from None
            off = inflight.pop(getattr(reply, "req", -1), None)
            if off is None:
                continue
            if isinstance(reply, Error):
                self._reset_data(addr)
                raise SdfsError(reply.message)
            if not isinstance(reply, ChunkData) or reply.offset != off:
                self._reset_data(addr)
                raise SdfsError("unexpected reply")
            if len(reply.data) != min(chunk, size - off):
                self._reset_data(addr)
                raise SdfsError(f"short chunk at {off}: {len(reply.data)} bytes")
            deadline = time.monotonic() + self.cfg.transfer_timeout
            received[off] = reply.data
            while next_write < len(offsets) and offsets[next_write] in received:
                data = received.pop(offsets[next_write])
                hasher.update(data)
                out.write(data)
                next_write += 1
        if hasher.hexdigest() != checksum:
            raise SdfsError("checksum mismatch", corrupt=True)

    # -- metadata --------------------------------------------------------------------------------
    def delete(self, name: str) -> Any:
        validate_name(name, self.cfg.max_name_len)
        return self.rpc.call(Delete(0, name)).data  # type: ignore[attr-defined]

    def ls(self, pattern: str = "*") -> list[dict[str, Any]]:
        reply = self.rpc.call(ListFiles(0, pattern))
        return list((reply.data or {}).get("files", []))  # type: ignore[attr-defined]

    def store(self, node_addr: str) -> list[list[Any]]:
        """List the replicas held by one node (its data server address)."""
        sock = self._data(node_addr)
        req = next_req()
        sock.send(StoreList(req).encode())
        deadline = time.monotonic() + self.cfg.request_timeout
        while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000) + 1):
            reply = decode(sock.recv(), self.cfg.max_frame_bytes)
            if getattr(reply, "req", None) == req and isinstance(reply, Ok):
                return list(reply.data["files"])
        self._reset_data(node_addr)
        raise SdfsError(f"no answer from {node_addr}")

    def pull_replica(self, sources: list[str], name: str, version: int, size: int, checksum: str, store) -> None:
        """Fetch a replica from the first healthy source straight into a LocalStore (re-replication)."""
        errors = []
        for addr in sources:
            partial = store.begin(name, version, size, checksum)
            try:
                writer = _PartialWriter(partial)
                self._download_from(addr, name, version, size, checksum, writer)
                partial.finish()
                return
            except Exception as exc:
                partial.abort()
                errors.append(f"{addr}: {exc}")
        raise SdfsError(f"could not fetch {name} v{version}: {'; '.join(errors)}")


class _PartialWriter(io.RawIOBase):
    """Adapts a store PartialWrite to the file-like object _download_from writes into."""

    def __init__(self, partial) -> None:
        self.partial = partial
        self.pos = 0

    def write(self, data) -> int:  # type: ignore[override]
        self.partial.write(self.pos, bytes(data))
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

