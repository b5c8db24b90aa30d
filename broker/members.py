"""Membership requests at the coordinator: join, heartbeat, pulse, leave, view, and failure detection.

The registry itself (``common/membership.py``) is part of the replicated state: every change is
published on the VIEW topic and journalled as a ``member`` op. A worker's session (its slot) starts
with its Join and ends when it is gone; what it was running goes back to the queue.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from common.identity import split_node_id
from common.membership import Member, MembershipEvent
from common.protocol import (
    Error,
    ErrorCode,
    Heartbeat,
    Join,
    Leave,
    Pulse,
    Rejoin,
    Topic,
    ViewRequest,
    ViewSnapshot,
    ViewUpdate,
    Welcome,
)

if TYPE_CHECKING:
    from broker.coordinator import Coordinator

log = logging.getLogger("idunno.coordinator.members")


class Membership:
    def __init__(self, core: Coordinator) -> None:
        self.core = core
        self.registry = core.registry
        self.failures_detected = 0

    def publish_member(self, ev: MembershipEvent, now: float) -> None:
        member = ev.member.public()
        self.core.net.publish(Topic.VIEW, ViewUpdate(ev.seq, str(ev.event), member))
        self.core.journal("member", {"event": str(ev.event), "member": member, "seq": ev.seq})

    def on_join(self, ident: bytes, m: Join, now: float) -> None:
        core = self.core
        try:
            split_node_id(m.node_id)
        except ValueError as exc:
            core.net.send(ident, Error(0, ErrorCode.BAD_REQUEST, str(exc)))
            return
        known = self.registry.get(m.node_id)
        if known is not None and known.state != "alive":
            # A member declared failed (or that left) never comes back under the same id: the
            # node must start a new incarnation, so nobody trusts state from before its absence.
            core.net.send(ident, Rejoin(f"{m.node_id} was declared {known.state}"))
            return
        for gone in self.registry.superseded_by(m.node_id):
            log.info("member %s replaced by its new incarnation %s", gone.member.node_id, m.node_id)
            self.member_gone(gone, now)
        ev = self.registry.join(Member(m.node_id, m.role, m.data_addr, joined_at=core.clock()), now)
        if ev is not None:
            log.info("member %s joined (%s, data %s)", m.node_id, m.role, m.data_addr or "-")
            self.publish_member(ev, now)
            core.event("join", m.node_id, now)
        # Credit comes with the worker's Ready; results of the tasks it still holds will return credit.
        core.dispatcher.slots[m.node_id] = core.dispatcher.new_slot(m.inflight, now)
        core.net.send(ident, Welcome(m.node_id, core.term))
        core.send_outbox(core.master.node_report(m.node_id, m.store))
        self._reattach_tasks(m, now)

    def _reattach_tasks(self, m: Join, now: float) -> None:
        """Tasks the node still works on keep their queries out of the pending queue; the others go back."""
        live_tasks = set(m.inflight)
        jobs = self.core.state.jobs
        for task in jobs.tasks_of(m.node_id):
            if task.task_id not in live_tasks:
                self.core.emit("task.requeue", {"task_id": task.task_id}, now)
            elif (job := jobs.jobs.get(task.job_id)) is not None:
                # A takeover restored it with the minimum timeout; a long batch deserves its own.
                task.deadline = max(task.deadline, now + self.core.dispatcher.sizer.task_timeout(job, m.node_id))

    def on_heartbeat(self, ident: bytes, m: Heartbeat, now: float) -> None:
        core = self.core
        if not self.registry.heartbeat(m.node_id, now, m.busy):
            core.net.send(ident, Rejoin(f"{m.node_id} is not a live member here"))
            return
        slot = core.dispatcher.slots.get(m.node_id)
        if slot is not None:
            core.dispatcher.report(slot, m)
        elif core.is_primary:
            # A member we restored (state store) heartbeating as if joined: this coordinator was
            # restarted at the address the worker follows, so the worker sees no new primary to
            # join. A Welcome re-attaches it (same incarnation; it answers with its Ready and
            # re-sends unacknowledged results), instead of a Rejoin that would cost a new identity.
            slot = core.dispatcher.slots[m.node_id] = core.dispatcher.new_slot((), now)
            core.dispatcher.report(slot, m)
            log.info("member %s re-attached after this coordinator's restart", m.node_id)
            core.net.send(ident, Welcome(m.node_id, core.term))

    def on_pulse(self, ident: bytes, m: Pulse, now: float) -> None:
        self.registry.pulse(m.node_id, now)  # handle() checked that the sender is the member's own sidecar

    def on_leave(self, ident: bytes, m: Leave, now: float) -> None:
        ev = self.registry.leave(m.node_id)
        if ev is not None:
            log.info("member %s left", m.node_id)
            self.member_gone(ev, now)

    def member_gone(self, ev: MembershipEvent, now: float) -> None:
        core = self.core
        node = ev.member.node_id
        self.publish_member(ev, now)
        core.event(str(ev.event), node, now)
        core.dispatcher.slots.pop(node, None)
        for task in core.state.jobs.tasks_of(node):
            core.emit("task.requeue", {"task_id": task.task_id}, now)
        core.master.node_down(node)
        # Re-replicate soon, but let simultaneous failures surface first so that no copy is planned
        # from (or onto) a node that is already dead but not yet declared.
        core.files.repair_soon(now + core.cfg.heartbeat_interval)

    def expire(self, now: float) -> None:
        """Declare the members that fell silent failed."""
        for ev in self.registry.expire(now):
            self.failures_detected += 1
            log.warning("member %s failed (silent for %.2fs)", ev.member.node_id, now - ev.member.last_seen)
            self.member_gone(ev, now)

    def on_view_request(self, ident: bytes, m: ViewRequest, now: float) -> None:
        self.core.net.send(ident, ViewSnapshot(m.req, self.registry.seq, self.registry.view()))
