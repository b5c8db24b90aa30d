"""The worker's copy of the membership view, for one question: how many workers share this machine.

The executor sizes its model memory budget by it (``model_memory_mb = 0``: this machine's share for
each of its workers, worker/executor.py). Snapshot from the primary (``ViewRequest``), then the
sequenced ``ViewUpdate``s on PUB; a gap asks for a new snapshot.
"""

from __future__ import annotations

import logging

from common.membership import ViewTracker
from common.protocol import ViewSnapshot, ViewUpdate
from common.rpc import next_req

log = logging.getLogger("idunno.worker")


class HostView:
    def __init__(self) -> None:
        self.view = ViewTracker()
        self.req: int | None = None  # the ViewRequest outstanding

    def reset(self) -> None:
        """A new primary: its view, from a new snapshot."""
        self.view = ViewTracker()
        self.req = None

    def wanted(self) -> int | None:
        """The req of a ViewRequest to send now, if the view needs a snapshot and none is asked for."""
        if self.req is not None or self.view.synced:
            return None
        self.req = next_req()
        return self.req

    def on_update(self, msg: ViewUpdate) -> None:
        if not self.view.update(msg.seq, msg.event, msg.member):
            log.info("membership view gap detected; re-syncing")
            self.req = None

    def on_snapshot(self, m: ViewSnapshot) -> None:
        if m.req == self.req:
            self.view.load_snapshot(m.seq, m.members)
            if not self.view.synced:  # a buffered update showed a gap: ask again
                self.req = None

    def workers_on(self, host: str) -> int:
        """Workers on ``host`` (by the view): they share its memory for models."""
        members = list(self.view.members.values())  # one copy: the executor's thread asks, the loop updates
        return max(1, sum(1 for m in members if m.state == "alive" and m.role == "worker"
                          and m.data_addr.rsplit(":", 1)[0] == host))
