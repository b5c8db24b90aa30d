"""The failover state machines (common/failover.py) row by row, in virtual time, without sockets.

Every row of COORDINATOR_TABLE is driven through the coordinator's real driver (broker/standby.py
``Failover``: the classifier from what was heard, the machine, the actions on the Coordinator and the
standby's transfer), with a fake peer and a fake coordinator that record what was done. Every row of
WORKER_TABLE is driven through a real ``Worker`` (sockets made, nothing started). The named tests
below state the Binary Star rules with expectations written out by hand, not read from the table.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest

from broker.standby import Failover, StandbySync
from common.config import Config
from common.failover import (
    COORDINATOR_TABLE,
    PRIMARY,
    PROBING,
    ROLE,
    STANDBY,
    STANDBY_STATES,
    WORKER_TABLE,
    Action,
    Event,
    Machine,
    PrimaryTracker,
    State,
    markdown_table,
    peer_event,
    vote_window,
)
from common.failure_detector import DetectorParams
from common.protocol import StateRequest, StateUpdate, decode

ROOT = Path(__file__).resolve().parent.parent
CFG = Config(failover_timeout=1.5, request_timeout=5.0)
ME, PEER = "10.0.0.2:5000", "10.0.0.1:5000"  # the peer's address sorts lower: it wins a tie
TERM = 5  # our term in the row tests
STEP_EVENTS = (Event.PEER_PRIMARY_OUTRANKS, Event.PEER_PRIMARY_OUTRANKED, Event.STARTING,
               Event.PEER_SILENT_VOTED, Event.NO_PRIMARY)
START_EVENTS = (Event.START_STANDBY, Event.START_PROBING, Event.START_ALONE)
SYNC_EVENTS = (Event.SYNC_DONE, Event.UPDATE_GAP, Event.UPDATE_NEWER_TERM)


class FakeCore:
    """The part of the Coordinator the failover driver uses; records each call in ``calls``."""

    def __init__(self, term: int = TERM, role: str = STANDBY) -> None:
        self.term, self.role, self.synced = term, role, False
        self.last_vote = -1e9
        self.calls: list[str] = []
        self.state_seq = 0
        self.applied: list[int] = []
        self.master = SimpleNamespace(apply_entries=lambda entries: None)

    def take_over(self, now: float) -> None:
        self.calls.append("take_over")
        self.role = PRIMARY

    def promote(self, now: float) -> None:  # the real one raises the term and takes over
        self.calls.append("promote")
        self.term += 1
        self.role = PRIMARY

    def demote(self) -> None:
        self.calls.append("demote")
        self.role = STANDBY

    def apply_update(self, seq: int, term: int, op: str, data: dict, now: float) -> None:
        self.state_seq = seq
        self.applied.append(seq)


class FakeLink:
    """The peer as heard: alive or not, its role and term; what we sent it."""

    def __init__(self, alive: bool = False, role: str = "", term: int = 0, addr: str = PEER) -> None:
        self.is_alive, self.role, self.term, self.addr = alive, role, term, addr
        self.sent: list[bytes] = []

    def alive(self, now: float) -> bool:
        return self.is_alive

    def send(self, payload: bytes) -> bool:
        self.sent.append(payload)
        return True


class FakeSync:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def sync(self, now: float) -> None:
        self.calls.append("sync")

    def request_snapshot(self, now: float) -> None:
        self.calls.append("request_snapshot")

    def drop(self) -> None:
        self.calls.append("drop")


def driver(state: State, link: FakeLink | None = None, term: int = TERM, fake_sync: bool = True,
           addr: str = ME) -> tuple[Failover, FakeCore]:
    core = FakeCore(term, ROLE.get(state, STANDBY))
    f = Failover(CFG, core, addr, link if link is not None else FakeLink())
    if fake_sync:
        f.sync = FakeSync(core.calls)
    f.fsm.state = state
    return f, core


# What the peer looks like for each per-step event (our term is TERM, we have been up 10 s).
OBSERVED = {
    Event.PEER_PRIMARY_OUTRANKS: dict(alive=True, role=PRIMARY, term=TERM + 1, up=10.0, vote_ago=None),
    Event.PEER_PRIMARY_OUTRANKED: dict(alive=True, role=PRIMARY, term=TERM - 1, up=10.0, vote_ago=None),
    Event.STARTING: dict(alive=False, role="", term=0, up=0.5, vote_ago=0.1),
    Event.PEER_SILENT_VOTED: dict(alive=False, role=PRIMARY, term=TERM, up=10.0, vote_ago=0.5),
    Event.NO_PRIMARY: dict(alive=True, role=STANDBY, term=TERM, up=10.0, vote_ago=0.5),  # a vote, but peer alive
}
# What each action visibly does to the fake coordinator and transfer, and what it logs.
CALLS = {Action.TAKE_OVER: ["take_over"], Action.PROMOTE: ["promote"], Action.DEMOTE: ["demote", "drop"],
         Action.SYNC: ["sync"], Action.RESYNC: ["request_snapshot"], Action.DROP_TRANSFER: ["drop"]}
LOGS = {Action.REFUSE_PROMOTION: "not promoting: this standby never synced",
        Action.WARN_PARTIAL: "promoting with the state of an unfinished re-sync",
        Action.LOG_PEER_PRIMARY: "is primary (term", Action.LOG_NO_PRIMARY: "no primary heard: starting as primary"}


def run_row(state: State, event: Event) -> tuple[Failover, FakeCore, int]:
    """Put a driver in ``state``, make ``event`` happen the way the server makes it happen; return the
    driver, its coordinator and the term the event carried."""
    now = 1000.0
    if event in START_EVENTS:
        link = None if event == Event.START_ALONE else FakeLink()
        core = FakeCore(TERM)
        f = Failover(CFG, core, ME, link)
        f.sync = FakeSync(core.calls) if link else None
        f.start(event == Event.START_STANDBY, now)
        return f, core, 0
    if event in STEP_EVENTS:
        o = OBSERVED[event]
        f, core = driver(state, FakeLink(o["alive"], o["role"], o["term"]))
        f.started = now - o["up"]
        if o["vote_ago"] is not None:
            core.last_vote = now - o["vote_ago"]
        assert peer_event(peer_alive=o["alive"], peer_role=o["role"], peer_term=o["term"], peer_addr=PEER,
                          term=TERM, addr=ME, up_for=o["up"], since_vote=now - core.last_vote,
                          failover_timeout=CFG.failover_timeout) == event
        f.step(now)
        return f, core, o["term"]
    carried = TERM + 2 if event == Event.UPDATE_NEWER_TERM else TERM
    f, core = driver(state)
    f.fire(event, now, carried)
    return f, core, carried


@pytest.mark.parametrize(("state", "event"), list(COORDINATOR_TABLE), ids=lambda v: str(v))
def test_coordinator_row(state: State, event: Event, caplog: pytest.LogCaptureFixture) -> None:
    row = COORDINATOR_TABLE[state, event]
    caplog.set_level(logging.INFO, logger="idunno.coordinator.server")
    f, core, carried = run_row(state, event)
    assert f.fsm.state == row.next
    assert core.role == ROLE[row.next]  # the role everyone sees follows the machine's state
    assert core.synced == (row.next in (State.STANDBY_SYNCED, State.PRIMARY)) or row.next == state
    assert core.calls == [c for a in row.actions for c in CALLS.get(a, [])]
    for action, text in LOGS.items():
        assert (text in caplog.text) == (action in row.actions), action
    start = TERM
    if Action.ADOPT_TERM in row.actions:
        start = max(TERM, carried)
    bumps = (Action.NEW_TERM in row.actions) + (Action.PROMOTE in row.actions)
    assert core.term == start + bumps


def test_the_coordinator_table_is_complete_where_events_can_happen() -> None:
    running = {State.PROBING, *STANDBY_STATES, State.PRIMARY}
    keys = set(COORDINATOR_TABLE)
    # Once per loop step every running state hears one of the peer events: each pair is a decision.
    assert {(s, e) for s in running for e in STEP_EVENTS} <= keys
    assert {(State.INIT, e) for e in START_EVENTS} <= keys
    # A transfer completes only at a standby that is not synced; updates apply only at a synced one.
    assert {(State.STANDBY_EMPTY, Event.SYNC_DONE), (State.STANDBY_SYNCING, Event.SYNC_DONE),
            (State.STANDBY_SYNCED, Event.UPDATE_GAP), (State.STANDBY_SYNCED, Event.UPDATE_NEWER_TERM)} <= keys
    assert len(keys) == len(running) * len(STEP_EVENTS) + len(START_EVENTS) + 4  # nothing else
    # Every action of the table has a handler in the driver.
    used = {a for row in COORDINATOR_TABLE.values() for a in row.actions}
    assert used == set(driver(State.INIT)[0].actions)


def reachable(table: dict, start: State) -> set[State]:
    seen, todo = {start}, deque([start])
    while todo:
        s = todo.popleft()
        for (src, _), row in table.items():
            if src == s and row.next not in seen:
                seen.add(row.next)
                todo.append(row.next)
    return seen


def test_every_state_is_reachable_and_no_empty_standby_promotes() -> None:
    states = {s for s, _ in COORDINATOR_TABLE} | {r.next for r in COORDINATOR_TABLE.values()}
    assert reachable(COORDINATOR_TABLE, State.INIT) == states
    for s in states - {State.INIT}:
        assert State.PRIMARY in reachable(COORDINATOR_TABLE, s), s  # nobody is stuck out of service
    assert all(row.next != State.PRIMARY for (s, _), row in COORDINATOR_TABLE.items() if s == State.STANDBY_EMPTY)
    # Only a silent peer plus a vote (or a probing start with no primary) makes a primary.
    makers = {(s, e) for (s, e), row in COORDINATOR_TABLE.items() if row.next == State.PRIMARY and s != row.next}
    assert {e for _, e in makers} <= {Event.START_ALONE, Event.PEER_SILENT_VOTED, Event.NO_PRIMARY}
    assert {s for s, e in makers if e == Event.NO_PRIMARY} == {State.PROBING}


def test_the_doc_shows_the_tables_of_the_code() -> None:
    doc = (ROOT / "docs" / "failover.md").read_text()
    for name, table in (("coordinator", COORDINATOR_TABLE), ("worker", WORKER_TABLE)):
        block = re.search(rf"<!-- {name} table: .*? -->\n(.*?)<!-- end -->", doc, re.S)
        assert block is not None, f"no {name} table in docs/failover.md"
        assert block.group(1) == markdown_table(table), (
            f"docs/failover.md's {name} table differs from common/failover.py: paste `python -m common.failover`")


# -- the rules, by hand ------------------------------------------------------------------------------


def test_peer_event_classifies_what_was_heard() -> None:
    base = dict(peer_alive=False, peer_role="", peer_term=0, peer_addr=PEER, term=3, addr=ME,
                up_for=10.0, since_vote=1e9, failover_timeout=1.5)
    assert peer_event(**base) == Event.NO_PRIMARY  # cut off from everyone: no vote
    assert peer_event(**base | dict(up_for=1.5)) == Event.STARTING  # not yet failover_timeout up
    assert peer_event(**base | dict(since_vote=2.99)) == Event.PEER_SILENT_VOTED
    assert vote_window(1.5) == 3.0 and vote_window(0.5) == 2.0
    assert peer_event(**base | dict(since_vote=3.0)) == Event.NO_PRIMARY  # the vote is too old
    alive = base | dict(peer_alive=True, since_vote=0.0)
    assert peer_event(**alive | dict(peer_role=STANDBY)) == Event.NO_PRIMARY  # a live standby peer: no vote counts
    assert peer_event(**alive | dict(peer_role=PRIMARY, peer_term=4)) == Event.PEER_PRIMARY_OUTRANKS
    assert peer_event(**alive | dict(peer_role=PRIMARY, peer_term=2)) == Event.PEER_PRIMARY_OUTRANKED
    # Equal terms: the lower address wins (string order), whoever looks.
    assert peer_event(**alive | dict(peer_role=PRIMARY, peer_term=3)) == Event.PEER_PRIMARY_OUTRANKS
    assert peer_event(**alive | dict(peer_role=PRIMARY, peer_term=3, peer_addr=ME, addr=PEER)) \
        == Event.PEER_PRIMARY_OUTRANKED
    # While it is up for less than failover_timeout, a live primary still counts at once.
    assert peer_event(**alive | dict(peer_role=PRIMARY, peer_term=3, up_for=0.1)) == Event.PEER_PRIMARY_OUTRANKS


def test_a_standby_that_never_synced_does_not_promote_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    link = FakeLink()
    f, core = driver(State.INIT, link)
    f.start(True, 0.0)
    assert (f.fsm.state, core.role) == (State.STANDBY_EMPTY, STANDBY)
    for t in range(2, 12):  # the primary is silent and workers keep voting
        core.last_vote = float(t)
        f.step(float(t))
    assert (f.fsm.state, core.role, core.term, core.calls) == (State.STANDBY_EMPTY, STANDBY, TERM, [])
    assert caplog.text.count("not promoting") == 1
    f.fire(Event.SYNC_DONE, 12.0, TERM)  # once it has synced, the same situation promotes it
    core.last_vote = 13.0
    f.step(13.0)
    assert (f.fsm.state, core.role, core.term, core.calls) == (State.PRIMARY, PRIMARY, TERM + 1, ["drop", "promote"])


def test_a_standby_promotes_only_when_the_primary_is_silent_and_a_worker_asked() -> None:
    link = FakeLink(alive=True, role=PRIMARY, term=4)
    f, core = driver(State.STANDBY_SYNCED, link, term=4)
    f.started = 0.0
    core.last_vote = 9.0  # a worker asked while the primary was alive: refused, no promotion
    f.step(10.0)
    assert f.fsm.state == State.STANDBY_SYNCED
    link.is_alive = False  # the primary dies; nobody asks us: cut off, we stay standby
    f.step(20.0)
    assert (f.fsm.state, core.role) == (State.STANDBY_SYNCED, STANDBY)
    core.last_vote = 20.5  # a worker asks for service
    f.step(21.0)
    assert (f.fsm.state, core.role, core.term) == (State.PRIMARY, PRIMARY, 5)
    assert core.synced


def test_a_standby_whose_resync_was_cut_short_promotes_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    f, core = driver(State.STANDBY_SYNCED, FakeLink(term=TERM))
    f.fire(Event.UPDATE_GAP, 1.0, TERM)
    assert (f.fsm.state, core.calls) == (State.STANDBY_SYNCING, ["request_snapshot"])
    core.last_vote = 9.5
    f.step(10.0)
    assert (f.fsm.state, core.term) == (State.PRIMARY, TERM + 1)
    assert "unfinished re-sync" in caplog.text


def test_a_primary_that_hears_a_higher_term_demotes_and_resyncs() -> None:
    link = FakeLink(alive=True, role=PRIMARY, term=7)
    f, core = driver(State.PRIMARY, link, term=5)
    f.step(10.0)
    assert (f.fsm.state, core.role, core.term, core.synced) == (State.STANDBY_SYNCING, STANDBY, 7, False)
    f.step(10.5)  # the next step asks the new primary for its snapshot
    assert core.calls == ["demote", "drop", "sync"]
    link.term = 3  # a lower-term primary is no reason to demote
    g, other = driver(State.PRIMARY, link, term=5)
    g.step(10.0)
    assert (g.fsm.state, other.calls) == (State.PRIMARY, [])


def test_split_brain_two_primaries_of_one_term_leave_exactly_one() -> None:
    """Two primaries of term 3 (a resumed SIGSTOPped one, or two probing at once) each hear the other."""
    links = {ME: FakeLink(alive=True, role=PRIMARY, term=3, addr=PEER),
             PEER: FakeLink(alive=True, role=PRIMARY, term=3, addr=ME)}
    pair = {a: driver(State.PRIMARY, links[a], term=3, addr=a) for a in (ME, PEER)}
    for t in (10.0, 10.5):
        for a, (f, core) in pair.items():
            f.step(t)
            links[PEER if a == ME else ME].role = core.role  # what the other hears next
    assert pair[PEER][0].fsm.state == State.PRIMARY  # the lower address keeps the role
    assert pair[ME][0].fsm.state == State.STANDBY_SYNCING
    assert [c.role for _, c in pair.values()].count(PRIMARY) == 1


def test_probing_becomes_standby_of_a_live_primary_or_primary_after_failover_timeout() -> None:
    f, core = driver(State.INIT, FakeLink(alive=True, role=PRIMARY, term=4), term=2)
    f.start(False, 0.0)
    assert (f.fsm.state, core.role) == (State.PROBING, PROBING)
    f.step(0.2)
    assert (f.fsm.state, core.role, core.term) == (State.STANDBY_EMPTY, STANDBY, 4)  # the peer's term
    # Nobody answers as primary (the peer was heard once with term 4, then went silent).
    g, other = driver(State.INIT, FakeLink(alive=False, role=PRIMARY, term=4), term=2)
    g.start(False, 0.0)
    g.step(1.0)
    assert g.fsm.state == State.PROBING  # not before failover_timeout
    g.step(1.6)
    assert (g.fsm.state, other.role, other.term, other.calls) == (State.PRIMARY, PRIMARY, 5, ["take_over"])


def test_started_alone_a_coordinator_is_primary_with_the_next_term() -> None:
    core = FakeCore(term=8)
    f = Failover(CFG, core, ME, None)
    f.start(False, 0.0)
    assert (f.fsm.state, core.role, core.term, core.calls) == (State.PRIMARY, PRIMARY, 9, ["take_over"])
    f.step(100.0)  # no peer: nothing ever changes
    assert (f.fsm.state, core.term) == (State.PRIMARY, 9)


def test_standby_sync_buffers_updates_until_synced_and_resyncs_on_a_gap_or_a_newer_term() -> None:
    """The real StandbySync: updates before the snapshot wait; a gap or a newer term asks for a new one."""
    link = FakeLink(alive=True, role=PRIMARY, term=3)
    f, core = driver(State.STANDBY_EMPTY, link, term=3, fake_sync=False)
    sync = f.sync
    assert isinstance(sync, StandbySync)
    sync.on_update(StateUpdate(1, 3, "op", {}))
    assert (sync.buffered, core.applied) == ([StateUpdate(1, 3, "op", {})], [])
    f.fire(Event.SYNC_DONE, 1.0, 3)
    sync.on_update(StateUpdate(1, 3, "op", {}))
    sync.on_update(StateUpdate(2, 3, "op", {}))
    assert core.applied == [1, 2] and f.fsm.state == State.STANDBY_SYNCED
    sync.on_update(StateUpdate(4, 3, "op", {}))  # 3 was lost
    assert f.fsm.state == State.STANDBY_SYNCING and not core.synced
    assert isinstance(decode(link.sent[0]), StateRequest)  # then the fetches of its first chunks
    f.fire(Event.SYNC_DONE, 2.0, 3)
    sync.on_update(StateUpdate(3, 6, "op", {}))  # a restarted primary of a newer term
    assert (f.fsm.state, core.term, core.applied) == (State.STANDBY_SYNCING, 6, [1, 2])
    assert sum(isinstance(decode(p), StateRequest) for p in link.sent) == 2
    f.fsm.state = State.PRIMARY
    sync.on_update(StateUpdate(5, 6, "op", {}))  # a primary ignores the peer's journal
    assert core.applied == [1, 2] and sync.buffered == []


# -- the worker --------------------------------------------------------------------------------------

A, B = "127.0.0.1:9", "127.0.0.1:11"  # nothing listens there: sends just queue


@pytest.fixture
def worker(tmp_path):
    from worker.worker import Worker  # noqa: PLC0415

    w = Worker(Config(coordinator=A, standby=B, torch=False, preload_models=""), tmp_path / "w", name="w0")
    yield w
    w.shutdown(leave=False)


def put_worker(w, state: State, now: float) -> None:
    """A worker in ``state``: following A (term 3, heard at ``now``) unless seeking."""
    w.fsm.state = state
    w.tracker.term = 3
    w.next_join = 50.0  # a Join went out a while ago
    if state != State.SEEKING:
        w.tracker.primary = A
        w.tracker.heard(A, PRIMARY, 3, now)


def test_primary_tracker_follows_the_highest_live_primary_and_never_an_older_term() -> None:
    t = PrimaryTracker.of([A, B], DetectorParams.fixed(1.5))
    assert t.event(0.0) is None
    t.heard(A, STANDBY, 3, 0.0)
    t.heard("10.9.9.9:1", PRIMARY, 9, 0.0)  # not one of ours
    assert t.event(0.0) is None
    t.heard(B, PRIMARY, 3, 0.0)
    assert t.event(0.1)[0] == Event.NEW_PRIMARY and t.event(0.1)[1].addr == B
    t.primary, t.term = B, 3
    assert t.event(0.2) is None
    t.heard(A, PRIMARY, 4, 0.3)  # both claim primary: the higher term wins
    assert t.event(0.4)[1].addr == A
    t.primary, t.term = A, 4
    t.heard(B, PRIMARY, 3, 0.5)  # older than ours: never followed again
    t.heard(A, STANDBY, 4, 0.5)
    assert t.event(0.6) is None
    assert t.event(5.0)[0] == Event.PRIMARY_SILENT  # A silent past the timeout, B too old
    t.excuse(10.0)  # we were frozen, not A silent
    assert t.event(5.0) is None


@pytest.mark.parametrize(("state", "event"), list(WORKER_TABLE), ids=lambda v: str(v))
def test_worker_row(worker, state: State, event: Event, caplog: pytest.LogCaptureFixture) -> None:
    w, row, now = worker, WORKER_TABLE[state, event], 100.0
    caplog.set_level(logging.INFO, logger="idunno.worker")
    put_worker(w, state, now)
    node, generation = w.node_id, w.generation
    w.held_reports.append(SimpleNamespace(encode=lambda: b""))  # a report made while detached
    if event == Event.NEW_PRIMARY:
        w.tracker.heard(B, PRIMARY, 4, now)
        w.last_tick = now
        w.tick(now)
    elif event == Event.PRIMARY_SILENT:
        w.last_tick = now + 60.0  # (this process was not stalled: A was silent for a minute)
        w.tick(now + 60.0)
    elif event in (Event.WELCOME, Event.WELCOME_STALE):
        w.on_welcome(SimpleNamespace(node_id=w.node_id if event == Event.WELCOME else "w0#old", term=4), B)
    else:
        w.on_rejoin(SimpleNamespace(reason="unknown member"))
    assert w.fsm.state == row.next
    assert w.joined == (row.next == State.ATTACHED)
    expect_primary = {Action.FOLLOW: B, Action.UNFOLLOW: None, Action.ADOPT_SENDER: B}
    primary = next((expect_primary[a] for a in row.actions if a in expect_primary),
                   None if state == State.SEEKING else A)
    assert w.primary == primary
    assert w.tracker.term == (4 if {Action.FOLLOW, Action.ATTACH} & set(row.actions) else 3)
    assert (w.held_reports == []) == (Action.ATTACH in row.actions)  # handed over on attaching
    assert (w.node_id != node and w.generation == generation + 1) == (Action.NEW_INCARNATION in row.actions)
    assert ("joined coordinator" in caplog.text) == (Action.LOG_JOINED in row.actions)
    # Joins go out at once: to the new primary, to every coordinator when there is none, or at the next tick.
    if Action.FOLLOW in row.actions:
        assert set(w.links.links) == {B}
    if Action.UNFOLLOW in row.actions:
        assert set(w.links.links) == {A, B}
    assert (w.next_join == 0.0) == (Action.NEW_INCARNATION in row.actions)


def test_worker_ignores_a_welcome_of_an_older_term(worker) -> None:
    put_worker(worker, State.ATTACHED, 0.0)
    worker.on_welcome(SimpleNamespace(node_id=worker.node_id, term=2), B)
    assert (worker.fsm.state, worker.primary, worker.tracker.term) == (State.ATTACHED, A, 3)


def test_the_worker_table_is_complete_where_events_can_happen(worker) -> None:
    keys = set(WORKER_TABLE)
    # A seeking worker follows no one: its primary cannot fall silent. (It can be asked to rejoin:
    # its Join goes to every coordinator, and one that declared it failed answers Rejoin.)
    impossible = {(State.SEEKING, Event.PRIMARY_SILENT)}
    states = (State.SEEKING, State.JOINING, State.ATTACHED)
    events = (Event.NEW_PRIMARY, Event.PRIMARY_SILENT, Event.WELCOME, Event.WELCOME_STALE, Event.REJOIN)
    assert keys == {(s, e) for s in states for e in events} - impossible
    assert reachable(WORKER_TABLE, State.SEEKING) == set(states)
    assert {a for row in WORKER_TABLE.values() for a in row.actions} == set(worker.actions)
    m = Machine(WORKER_TABLE, State.SEEKING)
    assert m.handle(Event.PRIMARY_SILENT) == () and m.state == State.SEEKING  # no row: nothing changes


def test_a_seeking_worker_asked_to_rejoin_starts_a_new_incarnation_and_joins_everyone(worker) -> None:
    """A seeking worker's Join reaches a coordinator that declared it failed: the Rejoin it gets
    back gives it a new id at once (it ignored it before, Joining on under the dead id)."""
    put_worker(worker, State.SEEKING, 100.0)
    node, generation = worker.node_id, worker.generation
    worker.on_rejoin(SimpleNamespace(reason="w0 was declared failed"))
    assert worker.fsm.state == State.SEEKING and worker.primary is None
    assert worker.node_id != node and worker.generation == generation + 1
    assert worker.next_join == 0.0  # its next Join, under the new id, goes out on the next step
    worker.step(101.0)
    assert set(worker.links.links) == {A, B}  # still no primary: it asks every coordinator


def test_a_rejoin_in_the_same_millisecond_still_gets_a_larger_incarnation(worker, monkeypatch) -> None:
    """The incarnation is wall-clock ms: a Rejoin right after start (or after the clock stepped
    back) must still change the id upward, or the coordinator would take it for the failed one."""
    from common import identity  # noqa: PLC0415
    from common.identity import split_node_id  # noqa: PLC0415

    name, inc = split_node_id(worker.node_id)
    monkeypatch.setattr(identity.time, "time_ns", lambda: (inc - 5) * 1_000_000)  # clock behind the id
    put_worker(worker, State.ATTACHED, 100.0)
    worker.on_rejoin(SimpleNamespace(reason="unknown member"))
    assert split_node_id(worker.node_id) == (name, inc + 1)
