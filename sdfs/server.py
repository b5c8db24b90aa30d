"""The SDFS data server of a node: a ROUTER that streams replica chunks in and out.

It runs in its own thread with its own socket so big transfers never delay the node's heartbeats.
Every request is answered (an Error reply for anything wrong); nothing a peer sends can stop it.
"""

from __future__ import annotations

import logging
import threading

import zmq

from common import security
from common.config import Config
from common.loop import run_until_stopped
from common.protocol import ChunkData, Error, ErrorCode, Message, Ok, ReadChunk, StoreList, WriteAck, WriteChunk
from common.transport import bind, make_socket, router_send, try_decode
from sdfs.names import BadName
from sdfs.store import LocalStore, PartialWrite, StoreError

log = logging.getLogger("idunno.sdfs.server")

PARTIAL_IDLE_TIMEOUT = 60.0


class StorageServer:
    def __init__(self, cfg: Config, store: LocalStore, ctx: zmq.Context | None = None, port: int = 0,
                 grant_key: bytes | None = None) -> None:
        self.cfg = cfg
        self.store = store
        # With keys, a version is stored only with the master's grant for it (common/security.py).
        self.grant_key = grant_key or (security.CURRENT.grant_key if security.CURRENT else None)
        self.ctx = ctx or zmq.Context.instance()
        self.sock = make_socket(self.ctx, zmq.ROUTER, cfg.max_frame_bytes, server=True)
        self.port = bind(self.sock, cfg.host, port)
        self.addr = f"{cfg.host}:{self.port}"
        self.partials: dict[tuple[bytes, str, int], PartialWrite] = {}
        self.handlers = {WriteChunk: self.on_write, ReadChunk: self.on_read, StoreList: self.on_store_list}
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    # -- loop ------------------------------------------------------------------------------
    def step(self, now: float, timeout_ms: int = 200) -> None:
        if self.sock.poll(timeout_ms):
            for _ in range(64):  # bounded batch so expiry still runs under load
                try:
                    frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 2:
                    log.warning("dropped message with %d frames", len(frames))
                    continue
                ident, frame = frames
                msg = try_decode(frame, self.cfg.max_frame_bytes, "data peer")
                if msg is None:
                    continue
                handler = self.handlers.get(type(msg))
                if handler is None:
                    req = getattr(msg, "req", 0)
                    self.reply(ident, Error(req, ErrorCode.BAD_REQUEST, f"{msg.TYPE} not served here"))
                    continue
                try:
                    handler(ident, msg)
                except Exception as exc:  # a bug must not kill the storage thread
                    log.exception("handler for %s failed", msg.TYPE)
                    self.reply(ident, Error(getattr(msg, "req", 0), ErrorCode.INTERNAL, str(exc)))
        self.expire(now)

    def run(self) -> None:
        try:
            run_until_stopped(self.step, self.stop_event, log)
        finally:
            for p in self.partials.values():
                p.abort()
            self.sock.close(0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="sdfs-data", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def reply(self, ident: bytes, msg: Message) -> None:
        router_send(self.sock, ident, msg)

    def expire(self, now: float) -> None:
        for key, p in list(self.partials.items()):
            if now - p.touched > PARTIAL_IDLE_TIMEOUT:
                log.warning("abandoned partial write of %s v%d", p.name, p.version)
                p.abort()
                del self.partials[key]

    # -- handlers --------------------------------------------------------------------------
    def on_write(self, ident: bytes, m: WriteChunk) -> None:
        key = (ident, m.name, m.version)
        try:
            partial = self.partials.get(key)
            if partial is None:
                if m.offset != 0:
                    raise StoreError(f"no transfer in progress for {m.name} v{m.version}")
                if self.grant_key is not None:
                    why = security.check_grant(self.grant_key, m.grant, m.name, m.version, m.size, m.checksum)
                    if why:
                        raise StoreError(why)
                if self.store.has(m.name, m.version):
                    info = self.store.info(m.name, m.version)
                    if info is not None and info.checksum == m.checksum:
                        # Idempotent retry of a write that already completed.
                        self.reply(ident, WriteAck(m.req, m.offset, True, True))
                        return
                partial = self.store.begin(m.name, m.version, m.size, m.checksum)
                self.partials[key] = partial
            partial.write(m.offset, m.data)
            if m.last:
                del self.partials[key]
                partial.finish()
                self.reply(ident, WriteAck(m.req, m.offset, True, True))
            else:
                self.reply(ident, WriteAck(m.req, m.offset, False, True))
        except (StoreError, BadName, OSError) as exc:
            p = self.partials.pop(key, None)
            if p is not None:
                p.abort()
            log.warning("write of %s v%d failed: %s", m.name, m.version, exc)
            self.reply(ident, WriteAck(m.req, m.offset, True, False, str(exc)))

    def on_read(self, ident: bytes, m: ReadChunk) -> None:
        # Capped by the frame limit, not our chunk size: a client with a larger chunk setting still
        # gets exactly what it asked for.
        length = max(0, min(m.length, max(self.cfg.chunk_bytes, self.cfg.max_frame_bytes - 65536)))
        try:
            data, eof = self.store.read(m.name, m.version, m.offset, length)
        except (StoreError, BadName, OSError) as exc:
            self.reply(ident, Error(m.req, ErrorCode.NOT_FOUND, str(exc)))
            return
        self.reply(ident, ChunkData(m.req, m.offset, data, eof))

    def on_store_list(self, ident: bytes, m: StoreList) -> None:
        items = [[i.name, i.version, i.size, i.checksum, i.mtime] for i in self.store.list()]
        self.reply(ident, Ok(m.req, {"files": items}))
