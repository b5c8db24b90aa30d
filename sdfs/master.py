"""The SDFS metadata master (hosted by the coordinator): the facade over its parts.

It owns file -> versions -> replica nodes, assigns versions (the single authority, so concurrent
puts get distinct monotonic versions), chooses placements, commits a version only when its write
quorum holds, re-replicates under-replicated versions and prunes old ones. It never touches file
data: it answers with plans and returns the commands nodes must run as an outbox of
``(node_id, Message)``. Every change of a file is persisted (SQLite) and announced to ``journal``
(the coordinator replicates it to the standby) as one idempotent record: the file's whole entry.

The coordinator sees one object, ``SdfsMaster``; the work is done by parts that each own one
concern and share one ``FileTable``:

* ``sdfs/table.py``      the namespace and the indexes kept in step with it (``FileTable``);
* ``sdfs/persist.py``    SQLite rows and journal records of changed entries (``MetaStore``);
* ``sdfs/puts.py``       puts in flight: versions, targets, quorum commits (``PendingPuts``);
* ``sdfs/tombstones.py`` deletes and their tombstones (``Tombstones``);
* ``sdfs/reports.py``    node store reports and bad-replica reports (``NodeReports``);
* ``sdfs/repair.py``     the dirty set worked off into re-replication plans (``RepairPlanner``);
* ``sdfs/placement.py``  where new replicas go.

This module keeps the read side (locate, ls, info), which needs every part's view, and the
attributes the coordinator, snapshot transfer and tests read (``files``, ``tombs``, ...).
See docs/sdfs.md.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from common.config import Config
from sdfs.errors import MasterError
from sdfs.names import BadName, match, validate_name
from sdfs.persist import JOURNAL_BATCH, Journal, MetaStore
from sdfs.puts import PUT_TIMEOUT, PendingPut, PendingPuts
from sdfs.repair import MAX_CHECKS_PER_TICK, MAX_REPAIRS_IN_FLIGHT, REPAIR_TIMEOUT, RepairPlanner
from sdfs.reports import NodeReports
from sdfs.table import FileTable, Key, Outbox, Tomb, VersionMeta
from sdfs.tombstones import Tombstones

# Re-exported: callers import these from here (the master's public surface did not move).
__all__ = [
    "JOURNAL_BATCH", "MAX_CHECKS_PER_TICK", "MAX_REPAIRS_IN_FLIGHT", "PUT_TIMEOUT", "REPAIR_TIMEOUT", "Key",
    "MasterError", "Outbox", "PendingPut", "SdfsMaster", "Tomb", "VersionMeta",
]


class SdfsMaster:
    """The master as the coordinator sees it: one object, the parts wired over one FileTable."""

    def __init__(
        self,
        cfg: Config,
        live_nodes: Callable[[], dict[str, str]],
        db_path: str | None = None,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.live_nodes = live_nodes  # node_id -> data addr of every alive storage node
        self.stats = Counter[str]()  # shared by every part; info() reports it
        self.table = FileTable()
        self.store = MetaStore(self.table, journal)
        changed = self.store.changed
        self.puts = PendingPuts(self.table, cfg, live_nodes, changed, self.stats)
        self.tombstones = Tombstones(self.table, cfg.tombstone_ttl, changed, self.stats, clock)
        self.reports = NodeReports(self.table, self.tombstones, cfg, live_nodes, self.puts.keys, changed,
                                   self.stats)
        self.planner = RepairPlanner(self.table, cfg, live_nodes, self.puts.load, changed, self.stats)
        if db_path:
            self.store.open(db_path)
            self.planner.loaded = bool(self.table.files)

    # -- state read by the coordinator, snapshot transfer and tests -------------------------------
    @property
    def files(self) -> dict[str, dict[int, VersionMeta]]:
        return self.table.files

    @property
    def next_version(self) -> dict[str, int]:
        return self.table.next_version

    @property
    def tombs(self) -> dict[str, Tomb]:
        return self.table.tombs

    @property
    def held(self) -> dict[str, set[Key]]:
        return self.table.held

    @property
    def tomb_pending(self) -> dict[str, set[str]]:
        return self.table.tomb_pending

    @property
    def dirty(self) -> dict[Key, None]:
        return self.table.dirty

    @property
    def pending(self) -> dict[str, PendingPut]:
        return self.puts.pending

    @property
    def repairs(self) -> dict[tuple[str, int, str], float]:
        return self.planner.repairs

    @property
    def db(self) -> Any:
        return self.store.db

    @property
    def clock(self) -> Callable[[], float]:
        return self.tombstones.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.tombstones.clock = clock

    # -- persistence and replication ----------------------------------------------------------------
    def entry(self, name: str) -> dict[str, Any]:
        return self.table.entry(name)

    def apply_entries(self, entries: dict[str, dict[str, Any]]) -> None:
        self.store.apply_entries(entries)

    def names(self) -> list[str]:
        """Every name with an entry: files, tombstones and names whose next version is reserved."""
        return list(self.table.names())

    def snapshot(self) -> dict[str, Any]:
        return self.store.snapshot()

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Replace the whole namespace with a snapshot's (a standby's full sync)."""
        self.store.restore(snapshot)

    # -- client operations ------------------------------------------------------------------------
    def begin_put(self, files: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        return self.puts.begin(files, now)

    def replace_targets(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """New targets for pending puts whose chosen replicas failed (HDFS pipeline recovery)."""
        return self.puts.replace_targets(requests)

    def commit_put(self, commits: list[dict[str, Any]], now: float) -> tuple[dict[str, str], Outbox]:
        """Commit puts whose quorum holds; return ({name: why} for failures, outbox)."""
        return self.puts.commit(commits, now)

    def _versions(self, name: str) -> dict[int, VersionMeta]:
        """The versions of an existing file, or the client's error."""
        try:
            validate_name(name, self.cfg.max_name_len)
        except BadName as exc:
            raise MasterError("bad_request", str(exc)) from None
        versions = self.table.files.get(name)
        if not versions:
            raise MasterError("not_found", f"no such file: {name}")
        return versions

    def delete(self, name: str) -> tuple[int, Outbox]:
        self._versions(name)
        return self.tombstones.delete(name, self.live_nodes())

    def locate(self, name: str, count: int) -> list[dict[str, Any]]:
        versions = self._versions(name)
        readable = _readable(versions, self.live_nodes())
        if not readable:
            newest = versions[max(versions)]
            raise MasterError("unavailable", f"{name} v{newest.version}: none of its {len(newest.holders)} "
                                             f"replica holders is alive")
        return readable[: max(1, count)]

    def source(self, name: str, version: int, reader: str, live: dict[str, str]) -> dict[str, Any] | None:
        """Where ``reader`` reads one version of a file, as Locate would answer (version, size,
        checksum, live replicas), for the coordinator to put in a Task (issue #14: no Locate per
        input); None if ``reader`` holds a replica itself or no live node does (it then asks Locate)."""
        meta = self.table.files.get(name, {}).get(version)
        if meta is None or reader in meta.holders or not any(h in live for h in meta.holders):
            return None
        return _version_view(meta, live)

    def ls(self, pattern: str) -> list[dict[str, Any]]:
        """Every file matching ``pattern`` that can be read now (its newest version has a live replica)."""
        live = self.live_nodes()
        files = self.table.files
        out = []
        for name in sorted(files):
            if match(pattern, name):
                readable = _readable(files[name], live)
                if readable:
                    out.append({"name": name, "versions": readable})
        return out

    def info(self) -> dict[str, Any]:
        live = self.live_nodes()
        files = self.table.files
        target = min(self.cfg.replication_factor, len(live)) if live else 0
        under = unavailable = 0
        for vs in files.values():
            for v in vs.values():
                n = sum(1 for h in v.holders if h in live)
                under += n < target
                unavailable += n == 0
        return {
            "files": len(files),
            "versions": sum(len(v) for v in files.values()),
            "bytes": sum(v.size for vs in files.values() for v in vs.values()),
            "replication_factor": self.cfg.replication_factor,
            "under_replicated": under,
            "unavailable": unavailable,
            "tombstones": len(self.table.tombs),
            "repairs_in_progress": len(self.planner.repairs),
            "load": {n: c for n, c in self.puts.load().items() if n in live},
            **dict(self.stats),
        }

    # -- node events ------------------------------------------------------------------------------
    def node_down(self, node_id: str) -> None:
        """The node is gone for now. Its copies stay in the metadata (it may come back with its disk:
        its report will say what it still has); every version it held is checked for repair."""
        self.planner.node_down(node_id)

    def node_report(self, node_id: str, store: list[list[Any]]) -> Outbox:
        """A node (re)joined with its replicas: its report is the truth about what it holds."""
        return self.reports.node_report(node_id, store)

    def stored(self, node_id: str, name: str, version: int, ok: bool, checksum: str) -> Outbox:
        return self.planner.stored(node_id, name, version, ok, checksum)

    def report_bad(self, node_id: str, name: str, version: int) -> Outbox:
        return self.reports.report_bad(node_id, name, version)

    def repair(self, now: float) -> Outbox:
        """Expire stale puts and tombstones, then plan re-replication of dirty versions (bounded
        work per call: the cost of a tick does not grow with the namespace)."""
        self.puts.expire(now)
        self.tombstones.expire()
        return self.planner.tick(now)

    def under_replicated(self) -> int:
        return self.planner.under_replicated()


def _readable(versions: dict[int, VersionMeta], live: dict[str, str]) -> list[dict[str, Any]]:
    """Views of the readable versions, newest first; [] if the newest one cannot be read (serving
    an older version instead would be a silent stale read)."""
    order = sorted(versions, reverse=True)
    if not order or not any(h in live for h in versions[order[0]].holders):
        return []
    return [_version_view(versions[n], live) for n in order if any(h in live for h in versions[n].holders)]


def _version_view(v: VersionMeta, live: dict[str, str]) -> dict[str, Any]:
    holders = [h for h in v.holders if h in live]
    random.shuffle(holders)  # spread reads
    return {
        "version": v.version,
        "size": v.size,
        "checksum": v.checksum,
        "mtime": v.mtime,
        "replicas": [{"node_id": h, "addr": live[h]} for h in holders],
    }
