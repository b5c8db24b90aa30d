"""The primary's journal reaches the standby as one frame per loop iteration (issue #14)."""

from __future__ import annotations

import msgpack
import pytest
from simcluster import SimCluster, state_updates

from common.protocol import VERSION, ProtocolError, StateUpdate, StateUpdates, Topic, decode


def test_state_updates_round_trip_and_a_malformed_batch_is_a_protocol_error():
    msg = StateUpdates(7, 2, ["a", "b"], [{"x": 1}, {}])
    back = decode(msg.encode())
    assert back == msg
    assert back.updates() == [StateUpdate(7, 2, "a", {"x": 1}), StateUpdate(8, 2, "b", {})]
    bad = msgpack.packb({"v": VERSION, "t": "state_updates", "first": 1, "term": 1, "ops": ["a", "b"], "data": [{}]})
    with pytest.raises(ProtocolError, match="2 ops but 1 data"):
        decode(bad)
    with pytest.raises(ProtocolError):
        decode(msgpack.packb({"v": VERSION, "t": "state_updates", "first": 1, "term": 1, "ops": [3], "data": [{}]}))


def test_an_iterations_ops_go_in_one_frame_in_order_and_a_term_change_starts_a_new_one():
    sim = SimCluster({"m": 0.01}, speeds=[1, 1])
    sim.add_inputs("in", 40)
    sim.command("submit", model="m", inputs="in/", batch=1, start=True)
    sim.run_until(5.0)
    frames = [decode(raw) for topic, raw in sim.net.published if topic == Topic.STATE]
    ops = state_updates(sim.net.published)
    # Contiguous sequence numbers, every op once, and fewer frames than ops (a result and the
    # dispatch it frees a slot for go together).
    assert [u.seq for u in ops] == list(range(ops[0].seq, sim.core.state_seq + 1))
    assert any(isinstance(f, StateUpdates) for f in frames) and len(frames) < len(ops)
    journal = sim.core.log
    before = len(sim.net.published)
    journal.journal("noop.a", {})
    sim.core.term += 1
    journal.journal("noop.b", {})
    journal.publish()
    new = [decode(raw) for _, raw in sim.net.published[before:]]
    assert [(type(m), m.term) for m in new] == [(StateUpdate, sim.core.term - 1), (StateUpdate, sim.core.term)]
    assert [m.seq for m in new] == [sim.core.state_seq - 1, sim.core.state_seq]


def test_no_frame_holds_more_than_its_bound_and_big_ops_go_alone():
    # One frame per iteration must not grow past the standby's frame limit: a node re-homing 100k
    # replicas journals ~50 sdfs.files ops of 1-2 MB in one iteration (each sized to fit a frame).
    sim = SimCluster({"m": 0.01}, speeds=[1])
    journal = sim.core.log
    before = len(sim.net.published)
    for i in range(300):
        journal.journal("noop.small", {"i": i})
    journal.journal("sdfs.files", {"entries": {}})
    journal.journal("sdfs.files", {"entries": {}})
    journal.journal("noop.small", {"i": 300})
    journal.publish()
    frames = [decode(raw) for _, raw in sim.net.published[before:]]
    sizes = [len(f.ops) if isinstance(f, StateUpdates) else 1 for f in frames]
    assert sizes == [128, 128, 44, 1, 1, 1], sizes
    assert [f.op for f in frames[3:5]] == ["sdfs.files", "sdfs.files"]
    seqs = [f.first + k for f in frames if isinstance(f, StateUpdates) for k in range(len(f.ops))]
    seqs += [f.seq for f in frames if isinstance(f, StateUpdate)]
    assert sorted(seqs) == list(range(sim.core.state_seq - 302, sim.core.state_seq + 1))  # each op once
