"""The client's write data path: pipelined chunk streams to replica targets, one poll loop for all.

A put batch becomes one ``Stream`` per (file, target) and one ``PutGroup`` per file version (its
streams and its write quorum). ``UploadPipeline.run`` keeps at most ``max_active`` streams going,
each with at most ``transfer_window`` chunks in flight, reads every file from disk chunk by chunk
(memory stays bounded whatever the size) and gives up on a target that falls behind its peers
(see ``straggling``). It is separate from the client because it is pure data plane: it never talks
to the master, and the client decides (replace targets, commit, retry) from the streams' results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import IO, Any

import zmq

from common.config import Config
from common.protocol import Error, Message, WriteAck, WriteChunk, decode
from common.rpc import next_req
from sdfs.channels import DataChannels

log = logging.getLogger("idunno.sdfs.client")

STRAGGLER_GRACE = 2.0  # seconds a target may lag behind its peers (or as long as they took), even on a busy machine
POLL_MS = 100  # the loop wakes at least this often to check for stragglers


@dataclass
class Stream:
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

    def finish(self, ok: bool, error: str) -> None:
        self.done, self.ok, self.error = True, ok, error
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if not ok:
            log.warning("upload of %s v%d to %s failed: %s", self.name, self.version, self.addr, error)


@dataclass
class PutGroup:
    """One file version being written: its streams (one per target tried) and its write quorum."""

    put_id: str
    name: str
    version: int
    quorum: int
    streams: list[Stream] = field(default_factory=list)
    first_done: float | None = None  # when the first replica acknowledged its last chunk
    quorum_at: float | None = None  # when the quorum-th replica did
    grant: str = ""

    def add(self, local: str, f: dict[str, Any], replicas: list[dict[str, str]]) -> list[Stream]:
        new = [Stream(local, self.name, self.version, f["size"], f["checksum"], r["addr"], r["node_id"],
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


def straggling(s: Stream, g: PutGroup, now: float, transfer_timeout: float, heard: float = 0.0) -> str | None:
    """Why to give up on a target now, or None to keep waiting.

    Peers of the same version set the pace: once one replica is written, a target that has not
    answered for as long as that took (at least STRAGGLER_GRACE) is replaced; once the version has
    its quorum, a target still writing gets that much longer, then the put goes on without it (the
    master brings the version to N in the background). Only a put whose targets are all slow waits
    for the full transfer_timeout.

    ``heard`` is when anything last came from the target's address: a node working through our
    other files' chunks (up to ``max_active`` streams share it, served in order) is busy, not
    stalled. Judging each stream alone gave up on every queued file of a busy node at once on a
    loaded machine, and their replacements queued behind the same work: the write quorum failed.
    """
    if now - s.last_progress > transfer_timeout:  # the backstop judges the stream alone
        return f"no answer from {s.addr} in {transfer_timeout:.0f}s"
    idle = now - max(s.last_progress, heard)
    if g.first_done is not None and idle > max(STRAGGLER_GRACE, g.first_done - s.began):
        return f"{s.addr} stalled for {idle:.1f}s while another replica finished"
    if g.quorum_at is not None and now - g.quorum_at > max(STRAGGLER_GRACE, g.quorum_at - s.began):
        return f"{s.addr} still writing {now - g.quorum_at:.1f}s after the write quorum"
    return None


class UploadPipeline:
    """One run of a set of streams until each is acknowledged, failed or given up on."""

    def __init__(self, cfg: Config, channels: DataChannels, streams: list[Stream], groups: dict[str, PutGroup],
                 max_active: int = 32) -> None:
        self.cfg = cfg
        self.channels = channels
        self.streams = streams
        self.groups = groups  # put_id -> group
        self.max_active = max_active
        self.by_req: dict[int, Stream] = {}  # chunk request id -> its stream (acks come in any order)
        self.pending = list(streams)
        self.active: list[Stream] = []
        self.poller = zmq.Poller()
        self.polled: set[str] = set()  # addresses whose socket is registered with the poller
        self.heard: dict[str, float] = {}  # address -> when anything last came from it

    def run(self) -> None:
        try:
            while self.pending or self.active:
                self._start_pending()
                for s in self.active:
                    self._pump(s)
                self._drop_stragglers(time.monotonic())
                self.active = [s for s in self.active if not s.done]
                if not self.active:
                    continue
                for sock, _ in self.poller.poll(POLL_MS):
                    self._drain(sock)
        finally:
            for s in self.streams:
                if s.fh is not None:
                    s.fh.close()

    def _start_pending(self) -> None:
        while self.pending and len(self.active) < self.max_active:
            s = self.pending.pop(0)
            s.last_progress = s.began = time.monotonic()
            self.active.append(s)
            sock = self.channels.get(s.addr)
            if s.addr not in self.polled:
                self.poller.register(sock, zmq.POLLIN)
                self.polled.add(s.addr)

    def _drop_stragglers(self, now: float) -> None:
        for s in self.active:
            if s.done:
                continue
            why = straggling(s, self.groups[s.put_id], now, self.cfg.transfer_timeout, self.heard.get(s.addr, 0.0))
            if why is None:
                continue
            s.finish(False, why)
            if any(o.addr == s.addr and not o.done for o in self.active):
                continue  # the socket still carries other files' writes: late acks are ignored
            self.channels.reset(s.addr)
            self.polled.discard(s.addr)
            self.poller = zmq.Poller()
            for a in self.polled:
                self.poller.register(self.channels.socks[a], zmq.POLLIN)

    def _drain(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frame = sock.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                ack = decode(frame, self.cfg.max_frame_bytes)
            except Exception:
                continue  # a malformed reply is dropped: its stream times out like a silent one
            self._on_ack(ack)

    def _on_ack(self, ack: Message) -> None:
        s = self.by_req.pop(getattr(ack, "req", -1), None)
        if s is None:
            return
        s.last_progress = self.heard[s.addr] = time.monotonic()  # even a late ack says the node is alive
        if s.done:
            return
        s.inflight.discard(ack.req)  # type: ignore[attr-defined]
        if isinstance(ack, WriteAck):
            if not ack.ok:
                s.finish(False, ack.error)
            elif ack.done:
                s.finish(True, "")
                self.groups[s.put_id].note_stored(s.last_progress)
        elif isinstance(ack, Error):
            s.finish(False, ack.message)

    def _pump(self, s: Stream) -> None:
        """Send chunks until the stream's window is full or its last chunk is sent."""
        if s.done:
            return
        if s.fh is None:
            s.fh = open(s.path, "rb")  # noqa: SIM115 - closed by finish / run
        sock = self.channels.get(s.addr)
        while len(s.inflight) < self.cfg.transfer_window and (s.next_offset < s.size or not s.started):
            data = s.fh.read(self.cfg.chunk_bytes)
            last = s.next_offset + len(data) >= s.size
            req = next_req()
            msg = WriteChunk(req, s.name, s.version, s.next_offset, data, s.size, s.checksum, last,
                             s.grant if s.next_offset == 0 else "")
            try:
                sock.send(msg.encode(), flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                s.finish(False, str(exc))
                return
            s.started = True
            s.inflight.add(req)
            self.by_req[req] = s
            s.next_offset += len(data)
            if last:
                break
