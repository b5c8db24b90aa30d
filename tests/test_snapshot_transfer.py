"""The chunked, resumable state transfer to the standby (broker/snapshot.py), in memory over the real protocol."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
from simcluster import MemoryNet, SimCluster, state_updates

from broker.coordinator import STANDBY, Coordinator
from broker.snapshot import SnapshotError, SnapshotReceiver, install
from common.protocol import Delete, Error, ErrorCode, StateChunk, StateFetch, StateRequest, decode

CHEAP = "sim-cheap"


def make_sim(files: int) -> SimCluster:
    sim = SimCluster({CHEAP: 0.02}, speeds=[1, 1, 1])
    sim.cfg.chunk_bytes = 32 * 1024  # many chunks from a small state
    sim.add_inputs("in", files)
    return sim


def standby_of(sim: SimCluster) -> Coordinator:
    return Coordinator(sim.cfg, "sim:2", MemoryNet(), role=STANDBY, clock=lambda: sim.t)


def updates(sim: SimCluster) -> list:
    sim.core.log.publish()  # what the loop would publish at its iteration's commit
    return state_updates(sim.net.published)


def replies(sim: SimCluster) -> list:
    out = [decode(b) for i, b in sim.net.outbox if i == b"standby"]
    sim.net.outbox = [(i, b) for i, b in sim.net.outbox if i != b"standby"]
    return out


def ask(sim: SimCluster, msg, wait: bool = True) -> list:
    """Deliver one standby request to the primary; return the primary's replies to the standby (a chunk
    is produced off the loop: the loop's tick sends it once the producer thread has it)."""
    sim.core.handle(b"standby", decode(msg.encode()), sim.t)
    deadline = time.monotonic() + 10
    out = replies(sim)
    while wait and isinstance(msg, StateFetch) and not out and time.monotonic() < deadline:
        threading.Event().wait(0.001)  # the producer thread runs meanwhile
        sim.core.tick(sim.t, expire=False)
        out = replies(sim)
    return out


def pull(sim: SimCluster, rx: SnapshotReceiver, lose: set[int] = frozenset(), between=None) -> int:
    """Run a transfer to the end with ``window`` fetches outstanding; chunks in ``lose`` are dropped once
    (the receiver resumes from the first missing one). Returns the most chunks the primary held."""
    lost: set[int] = set()
    held = 0
    queue = rx.wanted()
    while not rx.done:
        if not queue:
            queue = rx.resume(sim.t)  # nothing outstanding answered: the resume timer fired
        index = queue.pop(0)
        (reply,) = ask(sim, StateFetch(rx.req, index, rx.have))
        assert isinstance(reply, StateChunk), reply
        if b"standby" in sim.core.transfers:
            held = max(held, len(sim.core.transfers[b"standby"].chunks))
        if index in lose and index not in lost:
            lost.add(index)
            continue
        rx.add(reply.index, reply.data, reply.last, sim.t)
        if between is not None:
            between()
        queue += rx.wanted()
    return held


def test_standby_gets_a_consistent_copy_while_the_primary_keeps_changing():
    sim = make_sim(3000)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    sim.run_until(2.0)
    standby = standby_of(sim)
    standby.master.apply_entries({"stale/only-here": {"next_version": 2, "versions": [  # gone at the primary
        {"version": 1, "size": 1, "checksum": "c", "mtime": 0.0, "holders": ["x"]}]}})
    # As the server does: SDFS slices go into the standby's master as they arrive.
    rx = SnapshotReceiver(77, sim.cfg.transfer_window, sim.t, sink=standby.master.apply_entries)
    assert ask(sim, StateRequest(77)) == []  # the transfer starts; chunks come as they are fetched
    seq = sim.core.state_seq
    deleted = []

    def keep_changing() -> None:  # results, new files and deletes land while the stream is produced
        sim.run_until(sim.t + 0.05)
        if len(deleted) < 5:
            name = f"in/img{len(deleted) * 500:05d}.jpg"
            sim.deliver("client", Delete(1, name))
            deleted.append(name)
        sim.add_inputs(f"new{len(deleted)}", 3)

    held = pull(sim, rx, lose={1, 4}, between=keep_changing)
    assert held <= sim.cfg.transfer_window + 2  # the primary keeps a window of encoded chunks, not the state
    assert rx.resumes >= 1 and rx.have > 10
    assert install(standby, rx, sim.t) == (seq, sim.core.term)
    assert "stale/only-here" not in standby.master.files
    for u in updates(sim):  # Clone: the updates after S, buffered meanwhile, applied after the install
        if u.seq > standby.state_seq:
            assert u.seq == standby.state_seq + 1
            standby.apply_op(u.op, u.data, sim.t)
            standby.state_seq = u.seq
    assert standby.state_seq == sim.core.state_seq
    mine_sdfs = standby.master.snapshot()["entries"]
    assert "stale/only-here" not in mine_sdfs  # removed: the standby mirrors the primary's namespace
    assert mine_sdfs == sim.core.master.snapshot()["entries"]
    assert not any(n in standby.master.files for n in deleted)
    mine, theirs = standby.jobs.jobs[job], sim.core.jobs.jobs[job]
    assert list(mine.results) == list(theirs.results)  # completion order kept
    assert set(standby.jobs.tasks) == set(sim.core.jobs.tasks)
    assert standby.views.cmd_jobs({}, sim.t) == sim.core.views.cmd_jobs({}, sim.t)


def test_a_new_request_supersedes_the_old_transfer_and_unknown_transfers_are_refused():
    sim = make_sim(2000)
    ask(sim, StateRequest(1))
    (first,) = ask(sim, StateFetch(1, 0, 0))
    assert isinstance(first, StateChunk) and first.index == 0 and not first.last
    ask(sim, StateRequest(2))
    (old,) = ask(sim, StateFetch(1, 1, 1))
    assert isinstance(old, Error) and old.code == ErrorCode.NOT_FOUND
    rx = SnapshotReceiver(2, 3, sim.t)
    pull(sim, rx)
    assert len(rx.result()[0]["sdfs"]["entries"]) == 2000
    (gone,) = ask(sim, StateFetch(2, 0, 0))  # freed once acknowledged
    assert isinstance(gone, Error) and gone.code == ErrorCode.NOT_FOUND
    sim.core.demote()
    (refused,) = ask(sim, StateRequest(3))
    assert isinstance(refused, Error) and refused.code == ErrorCode.NOT_PRIMARY


def test_the_receiver_keeps_at_most_a_window_of_requests_outstanding_and_stops_at_the_end():
    rx = SnapshotReceiver(5, 3, 0.0)
    assert rx.wanted() == [0, 1, 2]
    assert rx.wanted() == []
    stream = b"".join(msgpack.packb(r) for r in (["head", {"seq": 9, "term": 2, "jobs": 0, "files": 1,
                                                          "members": [], "view_seq": 0, "tasks": [],
                                                          "events": [], "cost": {}}],
                                                 ["sdfs", {"a": [2, [], None]}],
                                                 ["end", {"jobs": 0, "files": 1}]))
    parts = [stream[i:i + 40] for i in range(0, len(stream), 40)]
    rx.add(1, parts[1], len(parts) == 2, 0.0)  # early: kept until chunk 0 comes
    assert rx.have == 0
    rx.add(0, parts[0], False, 0.0)
    assert rx.have == 2
    for i in range(2, len(parts)):
        rx.wanted()
        rx.add(i, parts[i], i == len(parts) - 1, 0.0)
    assert rx.done and rx.result()[1:] == (9, 2)
    assert rx.wanted() == []


@pytest.mark.parametrize("stream", [
    b"\xc1garbage",
    msgpack.packb(["sdfs", {}]),  # no head
    msgpack.packb({"not": "a record"}),
    msgpack.packb(["head", {"jobs": 1, "files": 0}]) + msgpack.packb(["end", {}]),  # a job missing
    msgpack.packb(["head", {"jobs": 0, "files": 0}]),  # last chunk without the end record
])
def test_a_bad_stream_is_a_clear_error_not_a_crash(stream):
    rx = SnapshotReceiver(1, 2, 0.0)
    with pytest.raises(SnapshotError):
        rx.add(0, stream, True, 0.0)
