"""The SDFS data server over real ZeroMQ sockets: chunked writes, reads, errors and garbage."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from common.config import Config
from common.protocol import (
    ChunkData,
    Error,
    Heartbeat,
    Message,
    Ok,
    ReadChunk,
    StoreList,
    WriteAck,
    WriteChunk,
    decode,
)
from sdfs.server import StorageServer
from sdfs.store import LocalStore

REPLY_TIMEOUT_MS = 5000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Peer:
    """A DEALER talking to the server; every wait is a bounded poll, never a sleep."""

    def __init__(self, ctx: zmq.Context, addr: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{addr}")

    def send(self, msg: Message | bytes) -> None:
        self.sock.send(msg if isinstance(msg, bytes) else msg.encode())

    def recv(self) -> Message:
        assert self.sock.poll(REPLY_TIMEOUT_MS), "no reply from the storage server"
        return decode(self.sock.recv())

    def call(self, msg: Message | bytes) -> Message:
        self.send(msg)
        return self.recv()

    def write(self, name: str, version: int, data: bytes, chunks: int, checksum: str | None = None) -> list[WriteAck]:
        size = len(data)
        step = max(1, -(-size // chunks))
        offsets = list(range(0, size, step)) or [0]
        acks = []
        for i, off in enumerate(offsets):
            last = i == len(offsets) - 1
            chunk = WriteChunk(100 + i, name, version, off, data[off : off + step], size, checksum or sha(data), last)
            reply = self.call(chunk)
            assert isinstance(reply, WriteAck), reply
            acks.append(reply)
        return acks

    def read(self, name: str, version: int, length: int = 1000) -> bytes:
        out = b""
        for req in range(1, 10_000):
            reply = self.call(ReadChunk(req, name, version, len(out), length))
            assert isinstance(reply, ChunkData), reply
            assert reply.req == req and reply.offset == len(out)
            out += reply.data
            if reply.eof:
                return out
            assert reply.data, "no progress before eof"
        raise AssertionError("read never reached eof")

    def store_list(self, req: int = 77) -> list[list[object]]:
        reply = self.call(StoreList(req))
        assert isinstance(reply, Ok) and reply.req == req, reply
        return reply.data["files"]


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.term()


def start_server(ctx: zmq.Context, root: Path, cfg: Config | None = None) -> StorageServer:
    server = StorageServer(cfg or Config(host="127.0.0.1"), LocalStore(root), ctx=ctx, port=0)
    server.start()
    return server


@pytest.fixture
def server_and_peer(ctx: zmq.Context, tmp_path: Path) -> Iterator[tuple[StorageServer, Callable[[], Peer]]]:
    server = start_server(ctx, tmp_path / "node")
    peers: list[Peer] = []

    def new_peer() -> Peer:
        peers.append(Peer(ctx, server.addr))
        return peers[-1]

    try:
        yield server, new_peer
    finally:
        for p in peers:
            p.sock.close(0)
        server.stop()
        assert not server._thread.is_alive(), "storage server thread did not stop"


@pytest.fixture
def server(server_and_peer: tuple[StorageServer, Callable[[], Peer]]) -> StorageServer:
    return server_and_peer[0]


@pytest.fixture
def peer(server_and_peer: tuple[StorageServer, Callable[[], Peer]]) -> Peer:
    return server_and_peer[1]()


def test_server_binds_a_free_port(server: StorageServer) -> None:
    assert server.port > 0
    assert server.addr == f"127.0.0.1:{server.port}"


def test_chunked_write_then_read_back(server: StorageServer, peer: Peer) -> None:
    data = os.urandom(3000)
    acks = peer.write("data/img_001.jpg", 1, data, chunks=3)
    assert [(a.req, a.offset, a.done, a.ok) for a in acks] == [
        (100, 0, False, True),
        (101, 1000, False, True),
        (102, 2000, True, True),
    ]
    assert peer.read("data/img_001.jpg", 1, length=700) == data
    assert peer.read("data/img_001.jpg", 1, length=10**9) == data  # capped at chunk_bytes, still whole
    assert server.store.path("data/img_001.jpg", 1).read_bytes() == data
    (entry,) = peer.store_list()
    assert entry[:4] == ["data/img_001.jpg", 1, 3000, sha(data)]
    assert isinstance(entry[4], float)  # mtime
    assert server.partials == {}


def test_empty_file_write_and_read(peer: Peer) -> None:
    acks = peer.write("empty", 1, b"", chunks=1)
    assert [(a.done, a.ok) for a in acks] == [(True, True)]
    reply = peer.call(ReadChunk(5, "empty", 1, 0, 100))
    assert isinstance(reply, ChunkData) and reply.data == b"" and reply.eof


def test_bad_checksum_write_is_refused(server: StorageServer, peer: Peer) -> None:
    data = b"x" * 300
    acks = peer.write("f", 1, data, chunks=3, checksum=sha(b"not the data"))
    assert [a.ok for a in acks[:-1]] == [True, True]
    last = acks[-1]
    assert (last.done, last.ok) == (True, False)
    assert "checksum" in last.error
    assert peer.store_list() == []
    assert os.listdir(server.store.tmp_dir) == []
    reply = peer.call(ReadChunk(3, "f", 1, 0, 10))
    assert isinstance(reply, Error)


def test_reading_a_missing_file_is_an_error(peer: Peer) -> None:
    reply = peer.call(ReadChunk(9, "nope", 1, 0, 10))
    assert isinstance(reply, Error)
    assert (reply.req, reply.code) == (9, "not_found")
    for name, version in (("../etc/passwd", 1), ("a//b", 1), ("nope", 0), ("nope", -3)):
        reply = peer.call(ReadChunk(10, name, version, 0, 10))
        assert isinstance(reply, Error) and reply.req == 10


def test_out_of_order_chunk_aborts_the_transfer(server: StorageServer, peer: Peer) -> None:
    data = b"abcdefghij"
    ack = peer.call(WriteChunk(1, "f", 1, 0, data[:4], 10, sha(data), False))
    assert isinstance(ack, WriteAck) and ack.ok
    ack = peer.call(WriteChunk(2, "f", 1, 6, data[6:], 10, sha(data), True))  # skipped 4..6
    assert isinstance(ack, WriteAck) and not ack.ok and ack.done
    assert server.partials == {}  # popped before the reply was sent
    ack = peer.call(WriteChunk(3, "f", 1, 4, data[4:], 10, sha(data), True))  # the transfer is gone
    assert isinstance(ack, WriteAck) and not ack.ok
    assert [a.ok for a in peer.write("f", 1, data, chunks=2)] == [True, True]  # a fresh one works
    assert peer.read("f", 1) == data


def test_too_much_data_and_bad_names_are_refused(peer: Peer) -> None:
    ack = peer.call(WriteChunk(1, "f", 1, 0, b"12345", 3, sha(b"12345"), True))
    assert isinstance(ack, WriteAck) and not ack.ok
    ack = peer.call(WriteChunk(2, "../escape", 1, 0, b"x", 1, sha(b"x"), True))
    assert isinstance(ack, WriteAck) and not ack.ok
    ack = peer.call(WriteChunk(3, "g", 1, 0, b"", -1, sha(b""), True))
    assert isinstance(ack, WriteAck) and not ack.ok
    assert peer.store_list() == []


def test_retry_of_a_completed_write_is_idempotent(peer: Peer) -> None:
    data = b"payload" * 10
    peer.write("f", 2, data, chunks=3)
    ack = peer.call(WriteChunk(50, "f", 2, 0, data[:10], len(data), sha(data), False))
    assert isinstance(ack, WriteAck) and ack.ok and ack.done
    assert peer.read("f", 2) == data


def test_interleaved_writers_do_not_mix(server_and_peer: tuple[StorageServer, Callable[[], Peer]]) -> None:
    _, new_peer = server_and_peer
    a, b = new_peer(), new_peer()
    da, db = os.urandom(200), os.urandom(300)
    for i in range(2):
        last = i == 1
        ra = a.call(WriteChunk(i, "same", 1, i * 100, da[i * 100 : (i + 1) * 100], 200, sha(da), last))
        rb = b.call(WriteChunk(i, "other", 1, i * 150, db[i * 150 : (i + 1) * 150], 300, sha(db), last))
        assert isinstance(ra, WriteAck) and ra.ok and isinstance(rb, WriteAck) and rb.ok
    assert a.read("same", 1) == da
    assert b.read("other", 1) == db


def test_garbage_does_not_kill_the_server(server: StorageServer, peer: Peer) -> None:
    rng = random.Random(1234)
    for n in (0, 1, 3, 17, 200, 5000):
        peer.send(rng.randbytes(n))
    peer.send(b"\xc6\xff\xff\xff\xff")  # a bin claiming 4 GB
    peer.send(b"\x81\x01\x01")  # a map with an int key
    peer.sock.send_multipart([b"two", b"frames"])
    # no reply to any of that: the next reply is the answer to StoreList
    assert peer.store_list(req=1) == []

    reply = peer.call(Heartbeat("n@1", 0))  # valid message, wrong server
    assert isinstance(reply, Error)
    assert reply.code == "bad_request" and "heartbeat" in reply.message
    reply = peer.call(Ok(42, None))
    assert isinstance(reply, Error) and reply.req == 42
    assert peer.store_list(req=2) == []
    peer.write("after/garbage", 1, b"still works", chunks=2)
    assert peer.read("after/garbage", 1) == b"still works"
    assert server._thread.is_alive()


def test_oversized_frame_drops_only_that_peer(ctx: zmq.Context, tmp_path: Path) -> None:
    cfg = Config(host="127.0.0.1", max_frame_bytes=64 * 1024, chunk_bytes=16 * 1024)
    server = start_server(ctx, tmp_path / "node", cfg)
    big, good = Peer(ctx, server.addr), Peer(ctx, server.addr)
    try:
        big.send(WriteChunk(1, "f", 1, 0, b"\x00" * (256 * 1024), 256 * 1024, sha(b""), True))
        assert good.store_list() == []
        good.write("small", 1, b"ok", chunks=1)
        assert good.read("small", 1) == b"ok"
        assert server._thread.is_alive()
    finally:
        big.sock.close(0)
        good.sock.close(0)
        server.stop()
    assert not server._thread.is_alive()
