"""Failover as explicit state machines (zguide Binary Star), free of sockets and clocks.

Two tables, read top to bottom like the Binary Star table in the zguide:

- :data:`COORDINATOR_TABLE` — one coordinator of a primary/standby pair. Its events are facts the
  server observes: the peer heard as primary (outranking us or not), the peer silent while a worker
  asks us for service (a worker's ``Join``/``Heartbeat`` at a non-primary is its vote), the snapshot
  transfer finished, a gap or a newer term in the state updates, and the start-up mode.
- :data:`WORKER_TABLE` — a worker following the primary: which coordinator it talks to, and
  whether it is attached (welcomed) there.

Each row is ``(state, event) -> Row(next state, actions)``. The machine only says *what* happens;
the owner (``broker/server.py``, ``worker/worker.py``) maps each action to a method, the way a loop
maps message types to handlers. An event with no row in the current state changes nothing (it
cannot happen there: the owner never produces it, and ``tests/test_failover_fsm.py`` checks which
pairs are covered). The classifiers (:func:`peer_event`, :class:`PrimaryTracker`) turn what was
heard into one event; they are pure functions of their arguments, so every rule is unit-tested in
virtual time.

Rules that are easy to miss, each one a row below:
- A standby that never completed a sync does not promote (its empty state would hand out job ids
  and file versions again); one whose *re*-sync was cut short promotes with what it has.
- A standby promotes only when the primary is silent *and* a worker asked it for service: a
  standby cut off from everyone stays standby.
- Two primaries (a resumed SIGSTOPped one, or two probing at once): the lower term, or on equal
  terms the higher address, demotes itself and re-syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from common.failure_detector import DetectorParams, PhiAccrual

# The roles a coordinator announces (heartbeats, ``members``); users see these strings.
PRIMARY, STANDBY, PROBING = "primary", "standby", "probing"


class State(StrEnum):
    # coordinator
    INIT = "init"  # state restored from disk, not serving yet
    PROBING = "probing"  # started with a peer: is there a primary already?
    STANDBY_EMPTY = "standby-empty"  # standby that never completed a sync: may not promote
    STANDBY_SYNCING = "standby-syncing"  # held the state once (a re-sync is under way): may promote
    STANDBY_SYNCED = "standby-synced"  # holds the primary's snapshot and follows its updates
    PRIMARY = "primary"
    # worker
    SEEKING = "seeking"  # no primary: Join sent to every coordinator (each one a vote)
    JOINING = "joining"  # following a primary, Join sent, no Welcome yet
    ATTACHED = "attached"  # welcomed by the primary it follows: tasks, results, heartbeats


class Event(StrEnum):
    # coordinator start-up (a restart goes through INIT again)
    START_STANDBY = "start-standby"  # --standby
    START_PROBING = "start-probing"  # --peer, no --standby
    START_ALONE = "start-alone"  # no peer
    # coordinator, once per loop step: what the peer looks like (see peer_event)
    PEER_PRIMARY_OUTRANKS = "peer-primary-outranks"  # heard as primary, higher term (or equal, lower addr)
    PEER_PRIMARY_OUTRANKED = "peer-primary-outranked"  # heard as primary, but we rank above it
    STARTING = "starting"  # no primary heard, up for less than failover_timeout
    PEER_SILENT_VOTED = "peer-silent-voted"  # peer silent and a worker asked us for service lately
    NO_PRIMARY = "no-primary"  # peer heard as non-primary, or silent with no vote
    # coordinator, from the standby's snapshot transfer and state updates
    SYNC_DONE = "sync-done"  # snapshot installed
    UPDATE_GAP = "update-gap"  # a state update was missed
    UPDATE_NEWER_TERM = "update-newer-term"  # a state update of a newer term (a restarted primary)
    # worker (see PrimaryTracker.event)
    NEW_PRIMARY = "new-primary"  # a live primary of the highest term >= ours, not the one followed
    PRIMARY_SILENT = "primary-silent"  # the followed primary is silent and no other is heard
    WELCOME = "welcome"  # a Welcome for us, of a term >= ours
    WELCOME_STALE = "welcome-stale"  # a Welcome of a term >= ours, for an earlier incarnation of us
    REJOIN = "rejoin"  # the followed primary asks for a new incarnation


class Action(StrEnum):
    # coordinator
    ADOPT_TERM = "adopt-term"  # term = max(term, the term the event carries)
    NEW_TERM = "new-term"  # term + 1 (persisted before anything announces it)
    TAKE_OVER = "take-over"  # serve as primary with the state held (start-up, probing)
    PROMOTE = "promote"  # standby -> primary: new term, grace for members, work re-planned
    DEMOTE = "demote"  # primary -> standby: drop the snapshot transfers served, forget the own transfer
    SYNC = "sync"  # start, resume or restart the snapshot transfer from the primary
    RESYNC = "resync"  # a fresh snapshot transfer (the copy held is behind or of an older term)
    DROP_TRANSFER = "drop-transfer"  # forget the transfer under way and the updates buffered for it
    REFUSE_PROMOTION = "refuse-promotion"  # say (once) why a never-synced standby does not promote
    WARN_PARTIAL = "warn-partial"  # promoting with the state of an unfinished re-sync
    LOG_PEER_PRIMARY = "log-peer-primary"
    LOG_NO_PRIMARY = "log-no-primary"
    # worker
    FOLLOW = "follow"  # follow the new primary (its term), Join it now
    UNFOLLOW = "unfollow"  # no primary: Join every coordinator now
    ADOPT_SENDER = "adopt-sender"  # the Welcome's sender is a live primary of its term: follow it
    ATTACH = "attach"  # term = Welcome's; hand over unacknowledged results and held reports; Ready
    LOG_JOINED = "log-joined"
    NEW_INCARNATION = "new-incarnation"  # new node id, old tasks discarded, Join again


@dataclass(frozen=True)
class Row:
    next: State
    actions: tuple[Action, ...] = ()


S, E, A = State, Event, Action

# One coordinator of the pair. Rows that do nothing are listed too: they are decisions.
COORDINATOR_TABLE: dict[tuple[State, Event], Row] = {
    (S.INIT, E.START_STANDBY): Row(S.STANDBY_EMPTY),
    (S.INIT, E.START_PROBING): Row(S.PROBING),
    (S.INIT, E.START_ALONE): Row(S.PRIMARY, (A.NEW_TERM, A.TAKE_OVER)),

    (S.PROBING, E.PEER_PRIMARY_OUTRANKS): Row(S.STANDBY_EMPTY, (A.ADOPT_TERM, A.LOG_PEER_PRIMARY)),
    (S.PROBING, E.PEER_PRIMARY_OUTRANKED): Row(S.STANDBY_EMPTY, (A.ADOPT_TERM, A.LOG_PEER_PRIMARY)),
    (S.PROBING, E.STARTING): Row(S.PROBING),
    (S.PROBING, E.PEER_SILENT_VOTED): Row(S.PRIMARY, (A.ADOPT_TERM, A.NEW_TERM, A.TAKE_OVER, A.LOG_NO_PRIMARY)),
    (S.PROBING, E.NO_PRIMARY): Row(S.PRIMARY, (A.ADOPT_TERM, A.NEW_TERM, A.TAKE_OVER, A.LOG_NO_PRIMARY)),

    (S.STANDBY_EMPTY, E.PEER_PRIMARY_OUTRANKS): Row(S.STANDBY_EMPTY, (A.SYNC,)),
    (S.STANDBY_EMPTY, E.PEER_PRIMARY_OUTRANKED): Row(S.STANDBY_EMPTY, (A.SYNC,)),
    (S.STANDBY_EMPTY, E.STARTING): Row(S.STANDBY_EMPTY),
    (S.STANDBY_EMPTY, E.PEER_SILENT_VOTED): Row(S.STANDBY_EMPTY, (A.REFUSE_PROMOTION,)),
    (S.STANDBY_EMPTY, E.NO_PRIMARY): Row(S.STANDBY_EMPTY),
    (S.STANDBY_EMPTY, E.SYNC_DONE): Row(S.STANDBY_SYNCED),

    (S.STANDBY_SYNCING, E.PEER_PRIMARY_OUTRANKS): Row(S.STANDBY_SYNCING, (A.SYNC,)),
    (S.STANDBY_SYNCING, E.PEER_PRIMARY_OUTRANKED): Row(S.STANDBY_SYNCING, (A.SYNC,)),
    (S.STANDBY_SYNCING, E.STARTING): Row(S.STANDBY_SYNCING),
    (S.STANDBY_SYNCING, E.PEER_SILENT_VOTED): Row(S.PRIMARY, (A.WARN_PARTIAL, A.DROP_TRANSFER, A.ADOPT_TERM,
                                                             A.PROMOTE)),
    (S.STANDBY_SYNCING, E.NO_PRIMARY): Row(S.STANDBY_SYNCING),
    (S.STANDBY_SYNCING, E.SYNC_DONE): Row(S.STANDBY_SYNCED),

    (S.STANDBY_SYNCED, E.PEER_PRIMARY_OUTRANKS): Row(S.STANDBY_SYNCED),
    (S.STANDBY_SYNCED, E.PEER_PRIMARY_OUTRANKED): Row(S.STANDBY_SYNCED),
    (S.STANDBY_SYNCED, E.STARTING): Row(S.STANDBY_SYNCED),
    (S.STANDBY_SYNCED, E.PEER_SILENT_VOTED): Row(S.PRIMARY, (A.DROP_TRANSFER, A.ADOPT_TERM, A.PROMOTE)),
    (S.STANDBY_SYNCED, E.NO_PRIMARY): Row(S.STANDBY_SYNCED),
    (S.STANDBY_SYNCED, E.UPDATE_GAP): Row(S.STANDBY_SYNCING, (A.RESYNC,)),
    (S.STANDBY_SYNCED, E.UPDATE_NEWER_TERM): Row(S.STANDBY_SYNCING, (A.ADOPT_TERM, A.RESYNC)),

    (S.PRIMARY, E.PEER_PRIMARY_OUTRANKS): Row(S.STANDBY_SYNCING, (A.DEMOTE, A.ADOPT_TERM)),
    (S.PRIMARY, E.PEER_PRIMARY_OUTRANKED): Row(S.PRIMARY),
    (S.PRIMARY, E.STARTING): Row(S.PRIMARY),
    (S.PRIMARY, E.PEER_SILENT_VOTED): Row(S.PRIMARY),
    (S.PRIMARY, E.NO_PRIMARY): Row(S.PRIMARY),
}

# A worker following the primary coordinator.
WORKER_TABLE: dict[tuple[State, Event], Row] = {
    (S.SEEKING, E.NEW_PRIMARY): Row(S.JOINING, (A.FOLLOW,)),
    (S.SEEKING, E.WELCOME): Row(S.ATTACHED, (A.ADOPT_SENDER, A.LOG_JOINED, A.ATTACH)),
    (S.SEEKING, E.WELCOME_STALE): Row(S.JOINING, (A.ADOPT_SENDER,)),
    # A seeking worker Joins every coordinator; one that declared this incarnation failed answers
    # Rejoin. Ignored, the worker would keep Joining under a dead id until a primary is heard.
    (S.SEEKING, E.REJOIN): Row(S.SEEKING, (A.NEW_INCARNATION,)),

    (S.JOINING, E.NEW_PRIMARY): Row(S.JOINING, (A.FOLLOW,)),
    # Not attached yet: it keeps sending its Join to the primary it chose until another is heard.
    (S.JOINING, E.PRIMARY_SILENT): Row(S.JOINING),
    (S.JOINING, E.WELCOME): Row(S.ATTACHED, (A.ADOPT_SENDER, A.LOG_JOINED, A.ATTACH)),
    (S.JOINING, E.WELCOME_STALE): Row(S.JOINING, (A.ADOPT_SENDER,)),
    (S.JOINING, E.REJOIN): Row(S.JOINING, (A.NEW_INCARNATION,)),

    (S.ATTACHED, E.NEW_PRIMARY): Row(S.JOINING, (A.FOLLOW,)),
    (S.ATTACHED, E.PRIMARY_SILENT): Row(S.SEEKING, (A.UNFOLLOW,)),
    (S.ATTACHED, E.WELCOME): Row(S.ATTACHED, (A.ADOPT_SENDER, A.ATTACH)),
    (S.ATTACHED, E.WELCOME_STALE): Row(S.ATTACHED, (A.ADOPT_SENDER,)),
    (S.ATTACHED, E.REJOIN): Row(S.JOINING, (A.NEW_INCARNATION,)),
}

ROLE = {
    S.INIT: STANDBY,  # restored as a non-primary: replaying a finished job must not write its results
    S.PROBING: PROBING,
    S.STANDBY_EMPTY: STANDBY,
    S.STANDBY_SYNCING: STANDBY,
    S.STANDBY_SYNCED: STANDBY,
    S.PRIMARY: PRIMARY,
}

STANDBY_STATES = frozenset({S.STANDBY_EMPTY, S.STANDBY_SYNCING, S.STANDBY_SYNCED})

START_EVENT = {(True, True): E.START_STANDBY, (True, False): E.START_STANDBY,
               (False, True): E.START_PROBING, (False, False): E.START_ALONE}  # (standby, has peer)


class Machine:
    """A state and the table it moves by; :meth:`handle` returns the actions for the owner to run."""

    def __init__(self, table: dict[tuple[State, Event], Row], state: State) -> None:
        self.table = table
        self.state = state

    def handle(self, event: Event) -> tuple[Action, ...]:
        row = self.table.get((self.state, event))
        if row is None:
            return ()  # cannot happen in this state (see the module docstring): nothing changes
        self.state = row.next
        return row.actions

    @property
    def role(self) -> str:
        return ROLE.get(self.state, "")


def coordinator_machine() -> Machine:
    return Machine(COORDINATOR_TABLE, S.INIT)


def worker_machine() -> Machine:
    return Machine(WORKER_TABLE, S.SEEKING)


def vote_window(failover_timeout: float) -> float:
    """How long a worker's request at a non-primary counts as its vote for a promotion."""
    return max(2 * failover_timeout, 2.0)


def peer_event(*, peer_alive: bool, peer_role: str, peer_term: int, peer_addr: str, term: int, addr: str,
               up_for: float, since_vote: float, failover_timeout: float) -> Event:
    """The one event a coordinator's loop step observes about its peer (see COORDINATOR_TABLE)."""
    if peer_alive and peer_role == PRIMARY:
        outranks = peer_term > term or (peer_term == term and peer_addr < addr)
        return E.PEER_PRIMARY_OUTRANKS if outranks else E.PEER_PRIMARY_OUTRANKED
    if up_for <= failover_timeout:
        return E.STARTING
    if not peer_alive and since_vote < vote_window(failover_timeout):
        return E.PEER_SILENT_VOTED
    return E.NO_PRIMARY


@dataclass
class CoordinatorSeen:
    """What a worker last heard from one coordinator on its PUB socket."""

    addr: str
    role: str = ""
    term: int = 0
    detector: PhiAccrual | None = None  # None until first heard

    def heard(self, now: float, params: DetectorParams) -> None:
        if self.detector is None:
            self.detector = PhiAccrual(params, now)
        else:
            self.detector.heartbeat(now)

    def alive(self, now: float) -> bool:
        return self.detector is not None and not self.detector.failed(now)


@dataclass
class PrimaryTracker:
    """The worker's view of the coordinators: which one is primary, which one it follows.

    Heartbeats (and Welcomes, which prove a primary is alive) go in; :meth:`event` says whether the
    worker must switch (NEW_PRIMARY, with the coordinator to follow) or lost its primary
    (PRIMARY_SILENT). It follows the live primary of the highest term, never one older than its own.
    """

    params: DetectorParams
    coords: dict[str, CoordinatorSeen] = field(default_factory=dict)
    primary: str | None = None  # the coordinator followed
    term: int = 0  # the highest term followed or welcomed by

    @classmethod
    def of(cls, addrs: list[str], params: DetectorParams) -> PrimaryTracker:
        return cls(params, {a: CoordinatorSeen(a) for a in addrs})

    def heard(self, addr: str, role: str, term: int, now: float) -> None:
        c = self.coords.get(addr)
        if c is not None:  # a coordinator not configured here is not followed
            c.role, c.term = role, term
            c.heard(now, self.params)

    def excuse(self, gap: float) -> None:
        """This process stalled for ``gap`` seconds: the heartbeats waiting for us are not late."""
        for c in self.coords.values():
            if c.detector is not None:
                c.detector.excuse(gap)

    def best(self, now: float) -> CoordinatorSeen | None:
        primaries = [c for c in self.coords.values() if c.alive(now) and c.role == PRIMARY and c.term >= self.term]
        return max(primaries, key=lambda c: c.term, default=None)

    def event(self, now: float) -> tuple[Event, CoordinatorSeen] | None:
        best = self.best(now)
        if best is not None and best.addr != self.primary:
            return E.NEW_PRIMARY, best
        current = self.coords.get(self.primary) if self.primary is not None else None
        if best is None and self.primary is not None and (current is None or not current.alive(now)):
            return E.PRIMARY_SILENT, CoordinatorSeen(self.primary)
        return None


def markdown_table(table: dict[tuple[State, Event], Row]) -> str:
    """``table`` as the Markdown table in docs/failover.md (a test checks the page against the code)."""
    lines = ["| state | event | next state | actions |", "|---|---|---|---|"]
    for (state, event), row in table.items():
        actions = ", ".join(f"`{a}`" for a in row.actions) or "—"
        nxt = "(same)" if row.next == state else f"`{row.next}`"
        lines.append(f"| `{state}` | `{event}` | {nxt} | {actions} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m common.failover: the tables for docs/failover.md
    print("Coordinator:\n\n" + markdown_table(COORDINATOR_TABLE) + "\nWorker:\n\n" + markdown_table(WORKER_TABLE))
