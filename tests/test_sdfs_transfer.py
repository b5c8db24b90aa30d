"""The client's data plane on its own: the upload pipeline and replica reads against real in-process
storage servers (no coordinator), plus the pure rules they follow (stragglers, chunk checks)."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from common.config import Config
from common.protocol import ChunkData, Error, Ok
from common.transport import bind, make_socket
from sdfs.channels import DataChannels
from sdfs.download import _bad_chunk, read_replica
from sdfs.errors import SdfsError
from sdfs.server import StorageServer
from sdfs.store import LocalStore
from sdfs.upload import STRAGGLER_GRACE, PutGroup, Stream, UploadPipeline, straggling

CHUNK = 1000
DATA = bytes(range(256)) * 20  # 5120 bytes: six chunks, an odd tail
SUM = hashlib.sha256(DATA).hexdigest()


def stream(**kw) -> Stream:
    return Stream("p", "f", 1, 10, "c", "addr", "n@1", put_id="p1", **kw)


def test_a_target_is_given_up_on_only_against_its_peers_pace_or_the_transfer_timeout() -> None:
    g = PutGroup("p1", "f", 1, quorum=2)
    s = stream(began=0.0, last_progress=0.0)
    assert straggling(s, g, 10.0, transfer_timeout=15.0) is None  # alone and slow: keep waiting
    assert "no answer" in straggling(s, g, 15.1, transfer_timeout=15.0)
    g.note_stored(5.0)  # a peer finished in 5 s: this one may stay idle that long (at least the grace)
    assert straggling(s, g, 5.0, transfer_timeout=15.0) is None
    assert "stalled" in straggling(s, g, 5.1, transfer_timeout=15.0)
    # The node acked another of our files 1 s ago: it is working through its queue, not stalled.
    assert straggling(s, g, 5.1, transfer_timeout=15.0, heard=4.1) is None
    assert "stalled" in straggling(s, g, 6.2, transfer_timeout=15.0, heard=1.1)
    assert "no answer" in straggling(s, g, 15.1, transfer_timeout=15.0, heard=15.0)  # the backstop is per stream
    busy = stream(began=0.0, last_progress=5.0)
    assert straggling(busy, g, 5.5, transfer_timeout=15.0) is None
    assert g.quorum_at is None
    g.streams = [stream(ok=True), stream(ok=True)]
    g.note_stored(6.0)  # quorum reached at 6 s: a target still writing gets max(grace, 6 s) more
    assert g.first_done == 5.0 and g.quorum_at == 6.0
    busy.last_progress = 10.5  # still making progress
    assert straggling(busy, g, 11.0, transfer_timeout=15.0) is None
    busy.last_progress = 11.5
    assert "after the write quorum" in straggling(busy, g, 12.1, transfer_timeout=15.0)


def test_bad_chunk_says_why_a_reply_is_not_the_chunk_asked_for() -> None:
    assert _bad_chunk(ChunkData(1, 0, b"x" * 10, False), 0, 10) is None
    assert _bad_chunk(Error(1, "gone", "no such replica"), 0, 10) == "no such replica"
    assert _bad_chunk(Error(1, "gone", ""), 0, 10) == ""  # an empty reason is still a failure
    assert _bad_chunk(ChunkData(1, 10, b"x" * 10, False), 0, 10) == "unexpected reply"
    assert _bad_chunk(Ok(1, {}), 0, 10) == "unexpected reply"
    assert "short chunk" in _bad_chunk(ChunkData(1, 0, b"x" * 9, False), 0, 10)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Config, zmq.Context, list[StorageServer], DataChannels]]:
    cfg = Config(host="127.0.0.1", chunk_bytes=CHUNK, transfer_window=2, transfer_timeout=10.0, request_timeout=1.0)
    ctx = zmq.Context()
    servers = [StorageServer(cfg, LocalStore(tmp_path / f"node{i}"), ctx=ctx, port=0) for i in range(2)]
    for s in servers:
        s.start()
    channels = DataChannels(cfg, ctx)
    try:
        yield cfg, ctx, servers, channels
    finally:
        channels.close()
        for s in servers:
            s.stop()
        ctx.term()


def test_the_pipeline_writes_every_file_to_every_target(rig, tmp_path: Path) -> None:
    cfg, _, servers, channels = rig
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    groups = {}
    for i in range(3):
        g = PutGroup(f"p{i}", f"f{i}", 1, quorum=2)
        g.add(str(src), {"size": len(DATA), "checksum": SUM}, [{"addr": s.addr, "node_id": f"n{j}@1"}
                                                               for j, s in enumerate(servers)])
        groups[g.put_id] = g
    streams = [st for g in groups.values() for st in g.streams]
    pipeline = UploadPipeline(cfg, channels, streams, groups, max_active=2)  # fewer slots than streams
    pipeline.run()
    assert all(st.ok and st.fh is None for st in streams), [st.error for st in streams]
    assert set(pipeline.heard) == {s.addr for s in servers}  # what the stall rule judges a node by
    for s in servers:
        for i in range(3):
            assert s.store.path(f"f{i}", 1).read_bytes() == DATA


def test_a_silent_target_is_given_up_on_once_its_peer_finished(rig, tmp_path: Path) -> None:
    cfg, ctx, servers, channels = rig
    silent = make_socket(ctx, zmq.ROUTER, cfg.max_frame_bytes, server=True)  # accepts, never answers
    port = bind(silent, "127.0.0.1", 0)
    try:
        src = tmp_path / "src.bin"
        src.write_bytes(DATA)
        g = PutGroup("p", "f", 1, quorum=1)
        g.add(str(src), {"size": len(DATA), "checksum": SUM}, [{"addr": servers[0].addr, "node_id": "n0@1"},
                                                               {"addr": f"127.0.0.1:{port}", "node_id": "mute@1"}])
        t0 = time.monotonic()
        UploadPipeline(cfg, channels, g.streams, {"p": g}).run()
        took = time.monotonic() - t0
    finally:
        silent.close(0)
    ok, mute = g.streams
    assert ok.ok and not mute.ok and "stalled" in mute.error
    assert STRAGGLER_GRACE <= took < cfg.transfer_timeout  # its peer's pace, not the full timeout
    assert f"127.0.0.1:{port}" not in channels.socks  # its socket was reset: late acks cannot confuse a retry


def test_read_replica_reads_verifies_and_reports_corruption_and_silence(rig) -> None:
    cfg, _, servers, channels = rig
    w = servers[0].store.begin("f", 1, len(DATA), SUM)
    w.write(0, DATA)
    w.finish()
    out = io.BytesIO()
    read_replica(cfg, channels, servers[0].addr, "f", 1, len(DATA), SUM, out)
    assert out.getvalue() == DATA
    with pytest.raises(SdfsError) as info:
        read_replica(cfg, channels, servers[0].addr, "f", 1, len(DATA), "0" * 64, io.BytesIO())
    assert info.value.corrupt  # the bytes arrived but are not the version asked for: worth reporting
    with pytest.raises(SdfsError) as info:
        read_replica(cfg, channels, servers[1].addr, "f", 1, len(DATA), SUM, io.BytesIO())
    assert not info.value.corrupt  # that node has no such replica: an error, not corruption
    assert servers[1].addr not in channels.socks


class SlowStore(LocalStore):
    """A busy node: every chunk takes ``delay`` seconds to write (served in order, as a real one)."""

    delay = 0.12

    def begin(self, name: str, version: int, size: int, checksum: str):
        w = super().begin(name, version, size, checksum)
        write = w.write

        def slow_write(offset: int, data: bytes) -> None:
            time.sleep(self.delay)  # the node's own loop is busy: this is what is being simulated
            write(offset, data)

        w.write = slow_write  # type: ignore[method-assign]
        return w


def test_a_busy_node_working_through_queued_files_is_not_given_up_on(tmp_path: Path) -> None:
    # Sixteen two-chunk files to a fast and a busy node: the busy one takes about 4 s for all of them
    # (its later files wait longer than STRAGGLER_GRACE after their fast copies), but it acks a chunk
    # every 0.12 s, so no file is given up on. Judged stream by stream, the queued files failed.
    cfg = Config(host="127.0.0.1", chunk_bytes=CHUNK, transfer_window=2, transfer_timeout=10.0, request_timeout=1.0)
    ctx = zmq.Context()
    fast = StorageServer(cfg, LocalStore(tmp_path / "fast"), ctx=ctx, port=0)
    busy = StorageServer(cfg, SlowStore(tmp_path / "busy"), ctx=ctx, port=0)
    channels = DataChannels(cfg, ctx)
    try:
        for s in (fast, busy):
            s.start()
        src = tmp_path / "src.bin"
        data = DATA[: 2 * CHUNK]
        src.write_bytes(data)
        groups = {}
        for i in range(16):
            g = PutGroup(f"p{i}", f"f{i}", 1, quorum=2)
            g.add(str(src), {"size": len(data), "checksum": hashlib.sha256(data).hexdigest()},
                  [{"addr": fast.addr, "node_id": "fast@1"}, {"addr": busy.addr, "node_id": "busy@1"}])
            groups[g.put_id] = g
        streams = [st for g in groups.values() for st in g.streams]
        t0 = time.monotonic()
        UploadPipeline(cfg, channels, streams, groups).run()
        took = time.monotonic() - t0
        assert all(st.ok for st in streams), [st.error for st in streams if not st.ok]
        assert took > STRAGGLER_GRACE  # the busy node's queue really outlasted the grace
        for i in range(16):
            assert busy.store.path(f"f{i}", 1).read_bytes() == data
    finally:
        channels.close()
        fast.stop()
        busy.stop()
        ctx.term()
