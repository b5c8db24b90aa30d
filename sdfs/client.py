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
    PutReplace,
    ReadChunk,
    ReportBad,
    StoreList,
    WriteAck,
    WriteChunk,
    decode,
)
from common.rpc import RpcClient, RpcError, next_req
from common.security import DATA
from common.transport import make_socket, tcp
from sdfs.names import validate_name
from sdfs.store import file_checksum, new_hasher

log = logging.getLogger("idunno.sdfs.client")

PUT_ATTEMPTS = 4  # a put batch is tried this often (with back-off) before its failures are reported
PUT_BACKOFF = 0.5  # seconds before the first retry, doubling (at most 5 s)
MAX_REPLACEMENT_ROUNDS = 3  # pipeline recovery: new targets asked for at most this often per try
STRAGGLER_GRACE = 2.0  # seconds a target may lag behind its peers (or as long as they took), even on a busy machine


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
    put_id: str = ""
    began: float = 0.0
    grant: str = ""  # the master's write grant for this version (sent with the first chunk)


@dataclass
class _Put:
    """One file version being written: its streams (one per target tried) and its write quorum."""

    put_id: str
    name: str
    version: int
    quorum: int
    streams: list[_Stream] = field(default_factory=list)
    first_done: float | None = None  # when the first replica acknowledged its last chunk
    quorum_at: float | None = None  # when the quorum-th replica did
    grant: str = ""

    def add(self, local: str, f: dict[str, Any], replicas: list[dict[str, str]]) -> list[_Stream]:
        new = [_Stream(local, self.name, self.version, f["size"], f["checksum"], r["addr"], r["node_id"],
                       put_id=self.put_id, grant=self.grant) for r in replicas]
        self.streams += new
        return new

    @property
    def tried(self) -> set[str]:
        return {st.node_id for st in self.streams}

    @property
    def stored(self) -> int:
        return sum(st.ok for st in self.streams)

    def stored_on(self) -> list[str]:
        return [st.node_id for st in self.streams if st.ok]

    def note_stored(self, now: float) -> None:
        if self.first_done is None:
            self.first_done = now
        if self.quorum_at is None and self.stored >= self.quorum:
            self.quorum_at = now


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
            sock = make_socket(self.ctx, zmq.DEALER, self.cfg.max_frame_bytes, keys=self.cfg.curve_dir, peer=DATA,
                               plain=self.cfg.insecure)
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
        groups: dict[str, _Put] = {}
        for p in plan.plans:
            f = by_name[p["name"]]
            g = _Put(p["put_id"], p["name"], p["version"], int(p["quorum"]), grant=str(p.get("grant") or ""))
            g.add(locals_[p["name"]], f, p["replicas"])
            groups[g.put_id] = g
        streams = [st for g in groups.values() for st in g.streams]
        for round_ in range(MAX_REPLACEMENT_ROUNDS + 1):
            self._run_uploads(streams, groups)
            short = [g for g in groups.values() if g.stored < g.quorum]
            if not short or round_ == MAX_REPLACEMENT_ROUNDS:
                break
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
                streams += g.add(locals_[g.name], by_name[g.name], p["replicas"])
            if not streams:
                break  # no live node left to try
        reply = self.rpc.call(PutCommit(0, [{"put_id": g.put_id, "stored": g.stored_on()} for g in groups.values()]))
        failed = (reply.data or {}).get("failed", {}) if isinstance(reply, Ok) else {}
        why: dict[str, str] = {}
        for name, reason in failed.items():
            g = next((g for g in groups.values() if g.name == name), None)
            errors = "; ".join(f"{st.addr}: {st.error}" for st in (g.streams if g else []) if not st.ok and st.error)
            why[name] = f"{reason}{f' ({errors})' if errors else ''}"
        return {g.name: g.version for g in groups.values() if g.name not in why}, why

    def _run_uploads(self, streams: list[_Stream], groups: dict[str, _Put], max_active: int = 32) -> None:
        by_req: dict[int, _Stream] = {}
        pending = list(streams)
        active: list[_Stream] = []
        poller = zmq.Poller()
        polled: set[str] = set()
        try:
            while pending or active:
                while pending and len(active) < max_active:
                    s = pending.pop(0)
                    s.last_progress = s.began = time.monotonic()
                    active.append(s)
                    sock = self._data(s.addr)
                    if s.addr not in polled:
                        poller.register(sock, zmq.POLLIN)
                        polled.add(s.addr)
                for s in active:
                    self._pump(s, by_req)
                now = time.monotonic()
                for s in active:
                    if s.done:
                        continue
                    why = self._straggling(s, groups[s.put_id], now)
                    if why is None:
                        continue
                    self._finish(s, False, why)
                    if any(o.addr == s.addr and not o.done for o in active):
                        continue  # the socket still carries other files' writes: late acks are ignored
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
                                groups[s.put_id].note_stored(s.last_progress)
                        elif isinstance(ack, Error):
                            self._finish(s, False, ack.message)
        finally:
            for s in streams:
                if s.fh is not None:
                    s.fh.close()

    def _straggling(self, s: _Stream, g: _Put, now: float) -> str | None:
        """Why to give up on a target now, or None to keep waiting.

        Peers of the same version set the pace: once one replica is written, a target that has not
        answered for as long as that took (at least STRAGGLER_GRACE) is replaced; once the version has
        its quorum, a target still writing gets that much longer, then the put goes on without it (the
        master brings the version to N in the background). Only a put whose targets are all slow waits
        for the full transfer_timeout.
        """
        idle = now - s.last_progress
        if idle > self.cfg.transfer_timeout:
            return f"no answer from {s.addr} in {self.cfg.transfer_timeout:.0f}s"
        if g.first_done is not None and idle > max(STRAGGLER_GRACE, g.first_done - s.began):
            return f"{s.addr} stalled for {idle:.1f}s while another replica finished"
        if g.quorum_at is not None and now - g.quorum_at > max(STRAGGLER_GRACE, g.quorum_at - s.began):
            return f"{s.addr} still writing {now - g.quorum_at:.1f}s after the write quorum"
        return None

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
            msg = WriteChunk(req, s.name, s.version, s.next_offset, data, s.size, s.checksum, last,
                             s.grant if s.next_offset == 0 else "")
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

