"""Membership: one registry of peers (state + expiry) on the coordinator, one view tracker on subscribers.

The coordinator's :class:`MemberRegistry` is the failure detector: each member has a φ-accrual
detector (:mod:`common.failure_detector`) that learns its heartbeat rhythm, and a member silent past
its detector's deadline is declared failed. Every change is an event with a contiguous sequence
number, published on PUB; :class:`ViewTracker` applies a snapshot then the updates above its
sequence (zguide Clone) and reports a gap so the subscriber re-syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from common.failure_detector import DetectorParams, PhiAccrual
from common.identity import split_node_id


class MemberState(StrEnum):
    ALIVE = "alive"
    FAILED = "failed"
    LEFT = "left"


class Event(StrEnum):
    JOIN = "join"
    LEAVE = "leave"
    FAIL = "fail"


@dataclass
class Member:
    node_id: str
    role: str
    data_addr: str
    state: MemberState = MemberState.ALIVE
    joined_at: float = 0.0  # wall clock, for display
    last_seen: float = 0.0  # monotonic, local to the detector; not part of the view
    busy: int = 0
    detector: PhiAccrual | None = field(default=None, repr=False, compare=False)  # local, not replicated

    def public(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "role": self.role, "data_addr": self.data_addr, "state": str(self.state),
            "joined_at": self.joined_at, "busy": self.busy,
        }

    @classmethod
    def from_public(cls, d: dict[str, Any]) -> Member:
        return cls(
            node_id=str(d["node_id"]),
            role=str(d.get("role", "worker")),
            data_addr=str(d.get("data_addr", "")),
            state=MemberState(d.get("state", "alive")),
            joined_at=float(d.get("joined_at", 0.0)),
            busy=int(d.get("busy", 0)),
        )


@dataclass
class MembershipEvent:
    seq: int
    event: Event
    member: Member


class MemberRegistry:
    """The coordinator's registry of peers and failure detector."""

    def __init__(self, detector: DetectorParams | float, keep_dead: int = 64) -> None:
        # A bare number is a fixed timeout (the pre-φ behaviour; the baseline in bench/membership.py).
        self.params = detector if isinstance(detector, DetectorParams) else DetectorParams.fixed(detector)
        self.members: dict[str, Member] = {}
        self.seq = 0  # bumps on every membership change
        self.keep_dead = keep_dead

    # -- queries -------------------------------------------------------------------------
    def alive(self, role: str | None = None) -> list[Member]:
        return [
            m for m in self.members.values() if m.state is MemberState.ALIVE and (role is None or m.role == role)
        ]

    def is_alive(self, node_id: str) -> bool:
        m = self.members.get(node_id)
        return m is not None and m.state is MemberState.ALIVE

    def get(self, node_id: str) -> Member | None:
        return self.members.get(node_id)

    def view(self) -> list[dict[str, Any]]:
        return [m.public() for m in self.members.values()]

    def _detector(self, m: Member) -> PhiAccrual:
        if m.detector is None:
            m.detector = PhiAccrual(self.params, m.last_seen)
        return m.detector

    def deadline(self, node_id: str) -> float | None:
        m = self.members.get(node_id)
        return self._detector(m).deadline() if m is not None and m.state is MemberState.ALIVE else None

    def next_deadline(self) -> float | None:
        alive = [self._detector(m).deadline() for m in self.members.values() if m.state is MemberState.ALIVE]
        return min(alive) if alive else None

    def max_gap(self) -> float:
        """The longest heartbeat silence any live member recovered from (seconds)."""
        return max((m.detector.max_gap for m in self.members.values() if m.detector is not None), default=0.0)

    # -- changes -------------------------------------------------------------------------
    def _event(self, event: Event, member: Member) -> MembershipEvent:
        self.seq += 1
        return MembershipEvent(self.seq, event, member)

    def join(self, member: Member, now: float) -> MembershipEvent | None:
        """Admit a member; re-attaching an alive member (same incarnation) is not a new event."""
        old = self.members.get(member.node_id)
        member.last_seen = now
        if old is not None and old.state is MemberState.ALIVE:
            self._heard(old.node_id, now)
            old.data_addr = member.data_addr or old.data_addr
            return None
        self.members[member.node_id] = member
        self._forget_old_dead()
        return self._event(Event.JOIN, member)

    def _heard(self, node_id: str, now: float) -> Member | None:
        """Liveness of an alive member (its detector learns the arrival); None if not alive here."""
        m = self.members.get(node_id)
        if m is None or m.state is not MemberState.ALIVE:
            return None
        m.last_seen = now
        self._detector(m).heartbeat(now)
        return m

    def heartbeat(self, node_id: str, now: float, busy: int = 0) -> bool:
        """Record liveness; False means the sender is unknown or was declared dead (must rejoin)."""
        m = self._heard(node_id, now)
        if m is None:
            return False
        m.busy = busy
        return True

    def pulse(self, node_id: str, now: float) -> None:
        """Liveness from the member's pulse sidecar (no load report; unknown senders are ignored)."""
        self._heard(node_id, now)

    def leave(self, node_id: str) -> MembershipEvent | None:
        m = self.members.get(node_id)
        if m is None or m.state is not MemberState.ALIVE:
            return None
        m.state = MemberState.LEFT
        return self._event(Event.LEAVE, m)

    def superseded_by(self, node_id: str) -> list[MembershipEvent]:
        """A node joining as a new incarnation of a name: the older incarnations of that name still
        listed alive are dead (a process restarted faster than its failure could be detected, or a
        coordinator restored its member list from disk) and are declared failed now, or their stale
        addresses would be served until their heartbeats time out."""
        name, inc = split_node_id(node_id)
        events = []
        for m in self.members.values():
            if m.state is not MemberState.ALIVE or m.node_id == node_id:
                continue
            try:
                other, other_inc = split_node_id(m.node_id)
            except ValueError:
                continue
            if other == name and other_inc < inc:
                m.state = MemberState.FAILED
                events.append(self._event(Event.FAIL, m))
        return events

    def expire(self, now: float) -> list[MembershipEvent]:
        events = []
        for m in self.members.values():
            if m.state is MemberState.ALIVE and self._detector(m).failed(now):
                m.state = MemberState.FAILED
                events.append(self._event(Event.FAIL, m))
        return events

    def excuse_all(self, seconds: float) -> None:
        """Our own stall (a frozen loop): do not count it against anyone's heartbeats."""
        for m in self.members.values():
            if m.state is MemberState.ALIVE:
                self._detector(m).excuse(seconds)

    def touch_all(self, now: float) -> None:
        """Grace period after a takeover: nobody is blamed for the old primary's silence."""
        for m in self.members.values():
            m.last_seen = now
            m.detector = None  # a fresh history here: the old primary saw the heartbeats, not us

    def restore(self, members: list[dict[str, Any]], seq: int, now: float) -> None:
        self.members = {}
        for d in members:
            m = Member.from_public(d)
            m.last_seen = now
            self.members[m.node_id] = m
        self.seq = seq

    def apply(self, event: str, member: dict[str, Any], seq: int, now: float) -> None:
        """Apply a replicated event (standby side)."""
        m = Member.from_public(member)
        m.last_seen = now
        self.members[m.node_id] = m
        self.seq = seq

    def _forget_old_dead(self) -> None:
        dead = [m for m in self.members.values() if m.state is not MemberState.ALIVE]
        for m in dead[: max(0, len(dead) - self.keep_dead)]:
            del self.members[m.node_id]


class ViewTracker:
    """Subscriber side of the membership view: snapshot + contiguous updates, gap -> resync."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.seq = -1  # -1: no snapshot yet
        self.pending: list[tuple[int, str, dict[str, Any]]] = []

    @property
    def synced(self) -> bool:
        return self.seq >= 0

    def load_snapshot(self, seq: int, members: list[dict[str, Any]]) -> None:
        self.members = {d["node_id"]: Member.from_public(d) for d in members if "node_id" in d}
        self.seq = seq
        queued, self.pending = self.pending, []
        for item in sorted(queued, key=lambda it: it[0]):
            self.update(*item)

    def update(self, seq: int, event: str, member: dict[str, Any]) -> bool:
        """Apply one update. Return False if a gap was detected (caller must re-request a snapshot)."""
        if not self.synced:
            self.pending.append((seq, event, member))  # subscribed before the snapshot arrived
            return True
        if seq <= self.seq:
            return True  # already contained in the snapshot
        if seq != self.seq + 1:
            self.seq = -1  # gap: PUB dropped something at its high-water mark
            self.pending = []
            return False
        m = Member.from_public(member)
        self.members[m.node_id] = m
        self.seq = seq
        return True

    def alive(self, role: str | None = None) -> list[Member]:
        return [
            m for m in self.members.values() if m.state is MemberState.ALIVE and (role is None or m.role == role)
        ]
