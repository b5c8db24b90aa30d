"""SDFS metadata requests at the coordinator: the wire side of :class:`sdfs.master.SdfsMaster`.

Each handler turns one request into a master call and its reply (or an Error), sends what the
master wants sent to data nodes, and signs the write plans (a data node stores only a granted
version). Re-replication runs from :meth:`Files.repair` on the coordinator's tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from common.protocol import (
    Delete,
    ListFiles,
    Locate,
    Located,
    Message,
    Ok,
    PutBegin,
    PutCommit,
    PutPlan,
    PutReplace,
    ReportBad,
    Stored,
)
from common.security import grant
from sdfs.master import MasterError

if TYPE_CHECKING:
    from broker.coordinator import Coordinator

log = logging.getLogger("idunno.coordinator.files")


class Files:
    def __init__(self, core: Coordinator) -> None:
        self.core = core
        self.master = core.master
        self.next_repair = 0.0

    def repair_soon(self, when: float) -> None:
        self.next_repair = min(self.next_repair, when)

    def repair(self, now: float) -> None:
        if now >= self.next_repair:
            self.next_repair = now + self.core.cfg.repair_interval
            self.core.send_outbox(self.master.repair(now))

    def _call(self, ident: bytes, req: int, fn: Callable[[], Message]) -> None:
        try:
            self.core.net.send(ident, fn())
        except MasterError as exc:
            self.core.reply_error(ident, req, exc.code, str(exc))

    def on_put_begin(self, ident: bytes, m: PutBegin, now: float) -> None:
        self._call(ident, m.req, lambda: PutPlan(m.req, self._granted(self.master.begin_put(m.files, now))))

    def on_put_replace(self, ident: bytes, m: PutReplace, now: float) -> None:
        self._call(ident, m.req, lambda: PutPlan(m.req, self._granted(self.master.replace_targets(m.puts))))

    def _granted(self, plans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Sign each planned write: a data node stores a version only with the master's grant for it."""
        key = self.core.grant_key
        for p in plans:
            put = self.master.pending.get(p["put_id"])
            p["grant"] = grant(key, put.name, put.version, put.size, put.checksum) if key and put is not None else ""
        return plans

    def on_put_commit(self, ident: bytes, m: PutCommit, now: float) -> None:
        failed, out = self.master.commit_put(m.commits, now)
        self.core.send_outbox(out)
        self.core.net.send(ident, Ok(m.req, {"failed": failed}))

    def on_locate(self, ident: bytes, m: Locate, now: float) -> None:
        self._call(ident, m.req, lambda: Located(m.req, m.name, self.master.locate(m.name, m.count)))

    def on_delete(self, ident: bytes, m: Delete, now: float) -> None:
        def run() -> Message:
            n, out = self.master.delete(m.name)
            self.core.send_outbox(out)
            return Ok(m.req, {"deleted_versions": n})

        self._call(ident, m.req, run)

    def on_ls(self, ident: bytes, m: ListFiles, now: float) -> None:
        self.core.net.send(ident, Ok(m.req, {"files": self.master.ls(m.pattern)}))

    def on_report_bad(self, ident: bytes, m: ReportBad, now: float) -> None:
        self.core.send_outbox(self.master.report_bad(m.node_id, m.name, m.version))
        self.core.net.send(ident, Ok(m.req))
        self.next_repair = now

    def on_stored(self, ident: bytes, m: Stored, now: float) -> None:
        if not m.ok:
            log.warning("re-replication of %s v%d to %s failed: %s", m.name, m.version, m.node_id, m.error)
        self.core.send_outbox(self.master.stored(m.node_id, m.name, m.version, m.ok, m.checksum))
