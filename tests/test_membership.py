"""Membership: the coordinator's registry/failure detector, the subscriber's view tracker, node ids."""

from __future__ import annotations

from typing import Any

import pytest

from common import identity
from common.identity import make_node_id, new_incarnation, split_node_id
from common.membership import Event, Member, MemberRegistry, MembershipEvent, MemberState, ViewTracker

TIMEOUT = 1.5


def member(node_id: str, role: str = "worker", addr: str | None = None) -> Member:
    return Member(node_id=node_id, role=role, data_addr=f"{node_id.split('@')[0]}:9" if addr is None else addr)


def assert_contiguous(events: list[MembershipEvent], start_seq: int = 1) -> None:
    assert [e.seq for e in events] == list(range(start_seq, start_seq + len(events)))


# --------------------------------------------------------------------------------------------
# MemberRegistry


def test_join_heartbeat_expire_leave_events_are_contiguous() -> None:
    reg = MemberRegistry(TIMEOUT)
    events: list[MembershipEvent] = []
    for i, name in enumerate(["a@1", "b@1", "c@1"]):
        ev = reg.join(member(name), now=float(i))
        assert ev is not None and ev.event is Event.JOIN and ev.member.node_id == name
        events.append(ev)
    assert {m.node_id for m in reg.alive()} == {"a@1", "b@1", "c@1"}

    # a and b keep beating, c goes silent
    for t in (1.0, 2.0, 3.0):
        assert reg.heartbeat("a@1", t)
        assert reg.heartbeat("b@1", t, busy=2)
    assert reg.get("b@1").busy == 2
    assert reg.expire(3.0) == []  # c last seen at 2.0: 1.0 s < timeout
    assert reg.next_deadline() == pytest.approx(2.0 + TIMEOUT)

    failed = reg.expire(3.6)
    assert [(e.event, e.member.node_id) for e in failed] == [(Event.FAIL, "c@1")]
    events += failed
    assert reg.get("c@1").state is MemberState.FAILED
    assert not reg.is_alive("c@1")
    assert reg.expire(3.6) == []  # a failure is reported once

    left = reg.leave("b@1")
    assert left is not None and left.event is Event.LEAVE
    events.append(left)
    assert reg.get("b@1").state is MemberState.LEFT
    assert reg.leave("b@1") is None and reg.leave("zz@1") is None

    assert_contiguous(events)
    assert reg.seq == events[-1].seq
    assert [m.node_id for m in reg.alive()] == ["a@1"]


def test_expiry_is_strictly_after_the_timeout() -> None:
    reg = MemberRegistry(TIMEOUT)
    reg.join(member("a@1"), now=10.0)
    assert reg.expire(10.0 + TIMEOUT) == []
    assert len(reg.expire(10.0 + TIMEOUT + 1e-6)) == 1


def test_failed_member_heartbeat_returns_false_and_must_rejoin() -> None:
    reg = MemberRegistry(TIMEOUT)
    first = reg.join(member("a@1"), now=0.0)
    (fail,) = reg.expire(5.0)
    assert not reg.heartbeat("a@1", 5.1)
    assert reg.get("a@1").state is MemberState.FAILED  # a late heartbeat does not resurrect it
    assert reg.alive() == []
    assert not reg.heartbeat("never-joined@1", 5.1)

    rejoin = reg.join(member("a@1"), now=6.0)
    assert rejoin is not None and rejoin.event is Event.JOIN
    assert_contiguous([first, fail, rejoin])
    assert reg.heartbeat("a@1", 6.5)
    assert reg.is_alive("a@1")


def test_left_member_heartbeat_returns_false() -> None:
    reg = MemberRegistry(TIMEOUT)
    reg.join(member("a@1"), now=0.0)
    reg.leave("a@1")
    assert not reg.heartbeat("a@1", 0.1)
    assert reg.expire(100.0) == []  # a member that left is not failed later


def test_rejoining_an_alive_member_is_not_a_new_event() -> None:
    reg = MemberRegistry(TIMEOUT)
    reg.join(member("a@1", addr="h:1"), now=0.0)
    seq = reg.seq
    assert reg.join(member("a@1", addr="h:2"), now=1.0) is None
    assert reg.seq == seq
    assert reg.get("a@1").data_addr == "h:2"
    assert reg.get("a@1").last_seen == 1.0  # the re-attach counts as liveness
    assert reg.join(member("a@1", addr=""), now=1.2) is None
    assert reg.get("a@1").data_addr == "h:2"  # an empty address does not erase the known one
    assert reg.expire(1.2 + TIMEOUT - 0.01) == []


def test_new_incarnation_is_a_separate_member() -> None:
    reg = MemberRegistry(TIMEOUT)
    reg.join(member("h:1@100"), now=0.0)
    ev = reg.join(member("h:1@200"), now=0.1)
    assert ev is not None and ev.seq == 2
    assert {m.node_id for m in reg.alive()} == {"h:1@100", "h:1@200"}


def test_alive_filters_by_role_and_view_is_public() -> None:
    reg = MemberRegistry(TIMEOUT)
    reg.join(member("w@1"), now=0.0)
    reg.join(member("s@1", role="standby"), now=0.0)
    assert [m.node_id for m in reg.alive("standby")] == ["s@1"]
    assert [m.node_id for m in reg.alive("worker")] == ["w@1"]
    view = reg.view()
    assert all("last_seen" not in d for d in view)
    assert {d["state"] for d in view} == {"alive"}
    assert [Member.from_public(d).node_id for d in view] == ["w@1", "s@1"]


def test_dead_members_are_forgotten_beyond_keep_dead() -> None:
    reg = MemberRegistry(TIMEOUT, keep_dead=2)
    for i in range(5):
        reg.join(member(f"n{i}@1"), now=0.0)
        reg.leave(f"n{i}@1")
    reg.join(member("x@1"), now=0.0)
    dead = [m for m in reg.members.values() if m.state is not MemberState.ALIVE]
    assert len(dead) == 2
    assert reg.is_alive("x@1")


def test_touch_all_gives_a_grace_period() -> None:
    reg = MemberRegistry(TIMEOUT)
    reg.join(member("a@1"), now=0.0)
    reg.touch_all(10.0)
    assert reg.expire(10.0 + TIMEOUT) == []


def test_restore_and_apply_replicate_the_registry() -> None:
    primary = MemberRegistry(TIMEOUT)
    primary.join(member("a@1"), now=0.0)
    primary.join(member("b@1"), now=0.0)
    standby = MemberRegistry(TIMEOUT)
    standby.restore(primary.view(), primary.seq, now=50.0)
    ev = primary.leave("a@1")
    standby.apply(str(ev.event), ev.member.public(), ev.seq, now=51.0)
    assert standby.view() == primary.view()
    assert standby.seq == primary.seq
    nxt = standby.join(member("c@1"), now=52.0)
    assert nxt is not None and nxt.seq == primary.seq + 1  # the promoted standby continues the sequence


# --------------------------------------------------------------------------------------------
# ViewTracker


def pub(node_id: str, state: str = "alive", role: str = "worker") -> dict[str, Any]:
    return member(node_id, role=role).public() | {"state": state}


def test_view_snapshot_then_contiguous_updates() -> None:
    vt = ViewTracker()
    assert not vt.synced
    vt.load_snapshot(5, [pub("a@1"), pub("b@1")])
    assert vt.synced and vt.seq == 5
    assert {m.node_id for m in vt.alive()} == {"a@1", "b@1"}
    assert vt.update(6, "join", pub("c@1"))
    assert vt.update(7, "fail", pub("a@1", "failed"))
    assert vt.update(8, "leave", pub("b@1", "left"))
    assert vt.seq == 8
    assert [m.node_id for m in vt.alive()] == ["c@1"]
    assert vt.members["a@1"].state is MemberState.FAILED


def test_view_updates_at_or_below_snapshot_are_dropped() -> None:
    vt = ViewTracker()
    vt.load_snapshot(5, [pub("a@1")])
    assert vt.update(5, "fail", pub("a@1", "failed"))
    assert vt.update(3, "join", pub("old@1"))
    assert vt.seq == 5 and vt.synced
    assert "old@1" not in vt.members
    assert vt.members["a@1"].state is MemberState.ALIVE


def test_view_updates_before_snapshot_are_buffered_then_applied() -> None:
    vt = ViewTracker()
    # subscribed first: these arrive before the snapshot, out of order, some already in it
    assert vt.update(7, "join", pub("c@1"))
    assert vt.update(4, "join", pub("old@1"))  # contained in the snapshot
    assert vt.update(6, "fail", pub("a@1", "failed"))
    assert vt.members == {} and not vt.synced
    vt.load_snapshot(5, [pub("a@1"), pub("b@1")])
    assert vt.synced and vt.seq == 7
    assert {m.node_id for m in vt.alive()} == {"b@1", "c@1"}
    assert "old@1" not in vt.members
    assert vt.pending == []
    assert vt.update(8, "join", pub("d@1"))


def test_view_gap_returns_false_and_unsyncs() -> None:
    vt = ViewTracker()
    vt.load_snapshot(5, [pub("a@1")])
    assert not vt.update(7, "join", pub("c@1"))
    assert not vt.synced
    assert "c@1" not in vt.members
    # updates while waiting for the new snapshot are buffered again, then the snapshot re-syncs
    assert vt.update(8, "join", pub("d@1"))
    vt.load_snapshot(7, [pub("a@1"), pub("c@1")])
    assert vt.synced and vt.seq == 8
    assert {m.node_id for m in vt.alive()} == {"a@1", "c@1", "d@1"}


def test_view_gap_inside_buffered_updates_leaves_tracker_unsynced() -> None:
    vt = ViewTracker()
    vt.update(7, "join", pub("c@1"))  # 6 was lost
    vt.load_snapshot(5, [pub("a@1")])
    assert not vt.synced  # the caller must notice and request another snapshot
    assert "c@1" not in vt.members


def test_view_snapshot_skips_entries_without_node_id() -> None:
    vt = ViewTracker()
    vt.load_snapshot(1, [pub("a@1"), {"role": "worker"}])
    assert list(vt.members) == ["a@1"]


def test_view_duplicate_seq_before_snapshot_does_not_crash() -> None:
    vt = ViewTracker()
    # e.g. the old and the new primary both published seq 6 around a failover
    vt.update(6, "join", pub("c@1"))
    vt.update(6, "join", pub("d@1"))
    vt.load_snapshot(5, [pub("a@1")])
    assert vt.synced and vt.seq == 6


# --------------------------------------------------------------------------------------------
# identity


@pytest.mark.parametrize(
    ("addr", "inc"), [("127.0.0.1:7200", 1), ("host.example:1", 1700000000000), ("[::1]:5", 0), ("a@b:1", 7)]
)
def test_node_id_round_trip(addr: str, inc: int) -> None:
    node_id = make_node_id(addr, inc)
    assert node_id == f"{addr}@{inc}"
    assert split_node_id(node_id) == (addr, inc)


def test_node_id_default_incarnation_is_now() -> None:
    before = new_incarnation()
    addr, inc = split_node_id(make_node_id("h:1"))
    assert addr == "h:1"
    assert before <= inc <= new_incarnation()


@pytest.mark.parametrize("bad", ["", "h:1", "h:1@", "@123", "h:1@abc", "h:1@-5", "h:1@1.5", "h:1@ 12", "h:1@12@x"])
def test_malformed_node_ids_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="malformed node id"):
        split_node_id(bad)


def test_later_incarnation_is_larger(monkeypatch: pytest.MonkeyPatch) -> None:
    first = new_incarnation()
    # the next millisecond (no sleep: spin until the clock moves, bounded)
    for _ in range(10_000_000):
        later = new_incarnation()
        if later > first:
            break
    assert later > first
    a = split_node_id(make_node_id("h:1", first))[1]
    b = split_node_id(make_node_id("h:1"))[1]
    assert b > a
    # the incarnation is wall-clock milliseconds
    monkeypatch.setattr(identity.time, "time_ns", lambda: 1_234_567_891_000_000)
    assert new_incarnation() == 1_234_567_891
    # Replacing an incarnation of the same millisecond, or one from before the clock stepped back:
    # still above it (a rejoin must never reuse or lower its id).
    assert new_incarnation(after=1_234_567_891) == 1_234_567_892
    assert new_incarnation(after=1_234_567_999) == 1_234_568_000
    assert new_incarnation(after=5) == 1_234_567_891


def test_a_new_incarnation_of_a_name_declares_the_older_ones_failed():
    from common.membership import Member, MemberRegistry  # noqa: PLC0415

    reg = MemberRegistry(1.5)
    for node in ("worker-0@100", "worker-1@100", "worker-10@50"):
        reg.join(Member(node, "worker", "127.0.0.1:1"), 0.0)
    events = reg.superseded_by("worker-0@200")
    assert [(str(e.event), e.member.node_id) for e in events] == [("fail", "worker-0@100")]
    assert not reg.is_alive("worker-0@100") and reg.is_alive("worker-1@100") and reg.is_alive("worker-10@50")
    assert reg.superseded_by("worker-1@90") == []  # an older incarnation supersedes nothing
