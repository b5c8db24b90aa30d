"""The client's read data path: one replica fetched chunk by chunk, verified, written in order.

``read_replica`` keeps ``transfer_window`` chunk requests in flight to one node, writes chunks in
offset order as they arrive (memory stays bounded whatever the file size) and checks the whole
file's checksum at the end; a replica that fails it raises ``SdfsError(corrupt=True)`` so the
caller can report it. Finished downloads reach their destination through ``publish`` (a temp file
renamed into place), and ``PartialWriter`` lets a node's re-replication read straight into its
store. Separate from the client because it is pure data plane: which replica to try, and what to do
when one fails, is the client's decision.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import IO, Any

from common.config import Config
from common.protocol import ChunkData, Error, Message, ReadChunk, decode
from common.rpc import next_req
from sdfs.channels import DataChannels
from sdfs.errors import SdfsError
from sdfs.store import new_hasher


def read_replica(cfg: Config, channels: DataChannels, addr: str, name: str, version: int, size: int,
                 checksum: str, out: IO[bytes]) -> None:
    """Copy one replica of ``name`` v``version`` from the node at ``addr`` into ``out``."""
    sock = channels.get(addr)
    hasher = new_hasher()
    chunk = cfg.chunk_bytes
    offsets = list(range(0, size, chunk)) or [0]
    inflight: dict[int, int] = {}  # req -> offset
    received: dict[int, bytes] = {}
    next_send = 0
    next_write = 0
    # A dead or unreachable source never answers at all: give up on it sooner than on a slow one.
    deadline = time.monotonic() + min(cfg.request_timeout, cfg.transfer_timeout)
    while next_write < len(offsets):
        while next_send < len(offsets) and len(inflight) + len(received) < cfg.transfer_window:
            req = next_req()
            sock.send(ReadChunk(req, name, version, offsets[next_send], chunk).encode())
            inflight[req] = offsets[next_send]
            next_send += 1
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000) + 1):
            channels.reset(addr)
            raise SdfsError("timed out")
        try:
            reply = decode(sock.recv(), cfg.max_frame_bytes)
        except Exception as exc:
            channels.reset(addr)
            raise SdfsError(f"bad reply: {exc}") from None
        off = inflight.pop(getattr(reply, "req", -1), None)
        if off is None:
            continue  # a late reply to an earlier request
        why = _bad_chunk(reply, off, min(chunk, size - off))
        if why is not None:
            channels.reset(addr)
            raise SdfsError(why)
        deadline = time.monotonic() + cfg.transfer_timeout
        received[off] = reply.data  # type: ignore[attr-defined]
        while next_write < len(offsets) and offsets[next_write] in received:
            data = received.pop(offsets[next_write])
            hasher.update(data)
            out.write(data)
            next_write += 1
    if hasher.hexdigest() != checksum:
        raise SdfsError("checksum mismatch", corrupt=True)


def _bad_chunk(reply: Message, off: int, expected: int) -> str | None:
    """Why a reply to the read of the chunk at ``off`` is unusable (None if it is the chunk)."""
    if isinstance(reply, Error):
        return reply.message
    if not isinstance(reply, ChunkData) or reply.offset != off:
        return "unexpected reply"
    if len(reply.data) != expected:
        return f"short chunk at {off}: {len(reply.data)} bytes"
    return None


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


def publish(tmp: str, dest: Path) -> None:
    """Move a finished download into place with the mode a new file gets (mkstemp made it 0600)."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, dest)


class PartialWriter(io.RawIOBase):
    """Adapts a store PartialWrite to the file-like object read_replica writes into."""

    def __init__(self, partial: Any) -> None:
        self.partial = partial
        self.pos = 0

    def write(self, data) -> int:  # type: ignore[override]
        self.partial.write(self.pos, bytes(data))
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos
