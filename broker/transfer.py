"""Serving the state to a standby: chunked snapshot transfers (see broker/snapshot.py).

A StateRequest freezes the replicated state at the current seq; the standby fetches it chunk by
chunk (StateFetch), the SDFS entries produced off the loop.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from broker.snapshot import MAX_TRANSFERS, SnapshotSource
from common.protocol import ErrorCode, StateChunk, StateFetch, StateRequest

if TYPE_CHECKING:
    from broker.coordinator import Coordinator

log = logging.getLogger("idunno.coordinator.transfer")


class Transfers:
    def __init__(self, core: Coordinator) -> None:
        self.core = core
        self.transfers: dict[bytes, SnapshotSource] = {}  # snapshot transfers being served, by standby

    def _refuse_unless_primary(self, ident: bytes, req: int) -> bool:
        if self.core.is_primary:
            return False
        self.core.reply_error(ident, req, ErrorCode.NOT_PRIMARY, f"{self.core.addr} is {self.core.role}")
        return True

    def on_state_request(self, ident: bytes, m: StateRequest, now: float) -> None:
        """Start a chunked transfer of the state at the current seq."""
        if self._refuse_unless_primary(ident, m.req):
            return
        core = self.core
        t0 = time.perf_counter()
        old = self.transfers.pop(ident, None)  # a new request supersedes this standby's earlier transfer
        if old is not None:
            old.close()
        while len(self.transfers) >= MAX_TRANSFERS:
            self.transfers.pop(min(self.transfers, key=lambda k: self.transfers[k].last_used)).close()
        # Frozen at S: the head is built of fresh containers, the jobs are whole-entry records;
        # SDFS entries are read when their chunk is produced (only the names are taken now).
        head = core.state.head()
        jobs = [j.snapshot() for j in core.state.jobs.jobs.values()]
        names = core.master.names()
        self.transfers[ident] = SnapshotSource(m.req, core.state_seq, core.term, head, jobs, names, core.master,
                                               core.cfg.chunk_bytes, core.cfg.transfer_window + 2, now)
        log.info("snapshot transfer %d for %r: state seq %d, %d jobs, %d files (frozen in %.0f ms)",
                 m.req, ident[:40], core.state_seq, len(jobs), len(names), (time.perf_counter() - t0) * 1000)

    def on_state_fetch(self, ident: bytes, m: StateFetch, now: float) -> None:
        if self._refuse_unless_primary(ident, m.req):
            return
        src = self.transfers.get(ident)
        if src is None or src.req != m.req:
            self.core.reply_error(ident, m.req, ErrorCode.NOT_FOUND,
                                  f"no snapshot transfer {m.req} here: request a new one")
            return
        try:
            out = src.fetch(m.index, m.have, now)
        except LookupError as exc:
            self.core.reply_error(ident, m.req, ErrorCode.NOT_FOUND, str(exc))
            return
        if out is not None:
            self._send_chunk(ident, src, m.index, *out)
        # else: produced off the loop; sent by serve() when ready

    def _send_chunk(self, ident: bytes, src: SnapshotSource, index: int, data: bytes, last: bool) -> None:
        self.core.net.send(ident, StateChunk(src.req, index, data, last))
        if last:
            log.info("snapshot transfer %d sent: %d chunks, %.1f MB in %.2fs", src.req, index + 1, src.bytes / 1e6,
                     time.monotonic() - src.started)

    def serve(self, now: float) -> None:
        """Send chunks that were fetched before the producer thread had them; drop finished and idle transfers."""
        for ident, src in list(self.transfers.items()):
            for index, data, last in src.ready():
                self._send_chunk(ident, src, index, data, last)
            if src.error and src.waiting:
                self.core.reply_error(ident, src.req, ErrorCode.INTERNAL, src.error)
                src.waiting.clear()
            if src.done:
                src.close()
                del self.transfers[ident]
        # A transfer nobody fetched from for a while is abandoned (the standby died or started over).
        idle = max(60.0, 4 * self.core.cfg.request_timeout)
        for ident in [k for k, t in self.transfers.items() if now - t.last_used > idle]:
            self.transfers.pop(ident).close()

    def waiting(self) -> bool:
        return any(t.waiting for t in self.transfers.values())

    def close_all(self) -> None:
        for src in self.transfers.values():
            src.close()
        self.transfers.clear()
