"""The SDFS metadata master (hosted by the coordinator).

It owns file -> versions -> replica nodes, assigns versions (the single authority, so concurrent
puts get distinct monotonic versions), chooses placements, commits a version only when its write
quorum holds, re-replicates under-replicated versions and prunes old ones. It never touches file
data: it answers with plans and returns the commands nodes must run as an outbox of
``(node_id, Message)``. Every change of a file is persisted (SQLite) and announced to ``journal``
(the coordinator replicates it to the standby) as one idempotent record: the file's whole entry.

Holders are node ids (``name@incarnation``); a node's *name* is its stable identity (its data
directory), so a node that comes back under a new incarnation reports its store and replaces its
old incarnation as holder. A node's report is the truth about that node: a version the metadata
says it holds but it does not report is no longer held there, and a version left with no holder
at all is dropped (stale metadata never serves a file nobody has). Deletes leave a tombstone
(deleted version + the node names that still have to confirm) so that a replica reported by a
node that missed the delete is dropped, never resurrected; see docs/sdfs.md.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from common.config import Config
from common.identity import node_name
from common.protocol import Drop, Message, Replicate
from sdfs.names import BadName, match, validate_name

log = logging.getLogger("idunno.sdfs.master")

Outbox = list[tuple[str, Message]]
PUT_TIMEOUT = 600.0
REPAIR_TIMEOUT = 60.0
MAX_REPAIRS_IN_FLIGHT = 512
# Versions examined per repair tick: a big backlog (a restored namespace, a lost node holding
# 100k files) is worked through over several ticks instead of stalling the coordinator loop.
MAX_CHECKS_PER_TICK = 5000
JOURNAL_BATCH = 2000  # entries per journalled op (an entry is ~0.3-1 KB: far below one frame)

Key = tuple[str, int]  # (file name, version)


class MasterError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class VersionMeta:
    version: int
    size: int
    checksum: str
    mtime: float
    holders: set[str] = field(default_factory=set)  # node ids; some may be down (they may come back)

    def record(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "size": self.size,
            "checksum": self.checksum,
            "mtime": self.mtime,
            "holders": sorted(self.holders),
        }


@dataclass
class Tomb:
    """A deleted file: every version <= ``version`` is gone for good. ``pending`` are the names of
    the nodes that held a copy and have not yet shown (in a store report) that they dropped it."""

    version: int
    pending: set[str]
    at: float  # wall-clock time of the delete (the TTL runs from it; replicated, so wall clock)

    def record(self) -> dict[str, Any]:
        return {"version": self.version, "pending": sorted(self.pending), "at": self.at}


@dataclass
class PendingPut:
    put_id: str
    name: str
    version: int
    size: int
    checksum: str
    replicas: list[str]
    quorum: int
    deadline: float


class SdfsMaster:
    def __init__(
        self,
        cfg: Config,
        live_nodes: Callable[[], dict[str, str]],
        db_path: str | None = None,
        journal: Callable[[str, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.live_nodes = live_nodes  # node_id -> data addr of every alive storage node
        self.journal = journal or (lambda op, data: None)
        self.clock = clock  # wall clock: tombstone ages are replicated, so not monotonic time
        self.files: dict[str, dict[int, VersionMeta]] = {}
        self.next_version: dict[str, int] = {}
        self.tombs: dict[str, Tomb] = {}  # insertion order = deletion order (the TTL sweep pops the front)
        self.pending: dict[str, PendingPut] = {}
        self.pending_names = Counter[str]()
        self.repairs: dict[tuple[str, int, str], float] = {}
        self.committed: dict[str, str] = {}  # recent put ids -> name: a retried commit is not an error
        self.stats = Counter[str]()
        # Indexes kept in step with the holder sets, so that no per-tick or per-event path walks
        # the whole namespace: node name -> versions it holds, node id -> replica count (placement
        # load), node name -> tombstones waiting for it, versions that may need a repair.
        self.held: dict[str, set[Key]] = {}
        self.stored_load = Counter[str]()
        self.tomb_pending: dict[str, set[str]] = {}
        self.dirty: dict[Key, None] = {}  # an ordered set
        self.last_target = 0
        self.settle_until: float | None = None  # set by the first repair after loading metadata from disk
        self.loaded = False
        self.db: sqlite3.Connection | None = None
        if db_path:
            self._open_db(db_path)

    # -- persistence -----------------------------------------------------------------------------
    def _open_db(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, entry TEXT NOT NULL)")
        for name, entry in self.db.execute("SELECT name, entry FROM files"):
            self._load_entry(name, json.loads(entry))
        self.loaded = bool(self.files)
        log.info("loaded metadata of %d files (%d tombstones) from %s", len(self.files), len(self.tombs), path)

    def entry(self, name: str) -> dict[str, Any]:
        e: dict[str, Any] = {
            "next_version": self.next_version.get(name, 1),
            "versions": [v.record() for v in self.files.get(name, {}).values()],
        }
        tomb = self.tombs.get(name)
        if tomb is not None:
            e["tomb"] = tomb.record()
        return e

    @staticmethod
    def _empty(entry: dict[str, Any]) -> bool:
        """An entry that carries nothing worth remembering: its row is deleted."""
        return not entry.get("versions") and not entry.get("tomb") and int(entry.get("next_version", 1)) <= 1

    def _load_entry(self, name: str, entry: dict[str, Any]) -> None:
        versions = {
            int(r["version"]): VersionMeta(
                int(r["version"]), int(r["size"]), str(r["checksum"]), float(r["mtime"]), set(r["holders"])
            )
            for r in entry.get("versions", [])
        }
        self._set_versions(name, versions or None)
        t = entry.get("tomb")
        self._set_tomb(name, Tomb(int(t["version"]), set(t["pending"]), float(t["at"])) if t else None)
        if self._empty(entry):
            self.next_version.pop(name, None)
        else:
            self.next_version[name] = int(entry.get("next_version", 1))

    def _changed(self, names: Iterable[str]) -> None:
        """Persist and journal the whole entry of every changed file (idempotent records)."""
        entries = {n: self.entry(n) for n in names}
        if not entries:
            return
        self._persist(entries)
        # Several ops for a big change set (a restarted node re-homing 100k replicas): each journal
        # op must fit in one frame on its way to the standby.
        names = list(entries)
        for i in range(0, len(names), JOURNAL_BATCH):
            self.journal("sdfs.files", {"entries": {n: entries[n] for n in names[i:i + JOURNAL_BATCH]}})

    def _persist(self, entries: dict[str, dict[str, Any]]) -> None:
        if self.db is None:
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR REPLACE INTO files (name, entry) VALUES (?, ?)",
                [(n, json.dumps(e)) for n, e in entries.items() if not self._empty(e)],
            )
            gone = [(n,) for n, e in entries.items() if self._empty(e)]
            self.db.executemany("DELETE FROM files WHERE name = ?", gone)

    # replication from the primary (standby side) and snapshots
    def apply_entries(self, entries: dict[str, dict[str, Any]]) -> None:
        for name, e in entries.items():
            self._load_entry(name, e)
        self._persist(entries)

    def names(self) -> list[str]:
        """Every name with an entry: files, tombstones and names whose next version is reserved."""
        return list(self.files.keys() | self.next_version.keys() | self.tombs.keys())

    def snapshot(self) -> dict[str, Any]:
        return {"entries": {n: self.entry(n) for n in self.names()}}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Replace the whole namespace with a snapshot's (a standby's full sync)."""
        for name in list(set(self.files) | set(self.tombs)):
            self._set_versions(name, None)
            self._set_tomb(name, None)
        self.next_version.clear()
        entries = snapshot["entries"]
        for name, e in entries.items():
            self._load_entry(name, e)
        if self.db is not None:
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("DELETE FROM files")
        self._persist(entries)

    # -- indexes ---------------------------------------------------------------------------------
    def _index(self, name: str, v: VersionMeta) -> None:
        for h in v.holders:
            self.held.setdefault(node_name(h), set()).add((name, v.version))
            self.stored_load[h] += 1
        self.dirty[(name, v.version)] = None

    def _unindex(self, name: str, v: VersionMeta) -> None:
        for h in v.holders:
            self._unindex_holder(name, v, h)

    def _unindex_holder(self, name: str, v: VersionMeta, h: str) -> None:
        self.stored_load[h] -= 1
        if self.stored_load[h] <= 0:
            del self.stored_load[h]
        nn = node_name(h)
        if not any(node_name(o) == nn for o in v.holders if o != h):
            keys = self.held.get(nn)
            if keys is not None:
                keys.discard((name, v.version))
                if not keys:
                    del self.held[nn]

    def _set_versions(self, name: str, versions: dict[int, VersionMeta] | None) -> None:
        for v in self.files.pop(name, {}).values():
            self._unindex(name, v)
        if versions:
            self.files[name] = versions
            for v in versions.values():
                self._index(name, v)

    def _add_version(self, name: str, v: VersionMeta) -> None:
        self.files.setdefault(name, {})[v.version] = v
        self._index(name, v)

    def _pop_version(self, name: str, version: int) -> VersionMeta | None:
        versions = self.files.get(name)
        v = versions.pop(version, None) if versions else None
        if v is not None:
            self._unindex(name, v)
            if not versions:
                del self.files[name]
        return v

    def _add_holder(self, name: str, v: VersionMeta, node_id: str) -> bool:
        if node_id in v.holders:
            return False
        v.holders.add(node_id)
        self.stored_load[node_id] += 1
        self.held.setdefault(node_name(node_id), set()).add((name, v.version))
        self.dirty[(name, v.version)] = None
        return True

    def _remove_holder(self, name: str, v: VersionMeta, node_id: str) -> bool:
        if node_id not in v.holders:
            return False
        self._unindex_holder(name, v, node_id)  # before the discard: it looks for other ids of the name
        v.holders.discard(node_id)
        self.dirty[(name, v.version)] = None
        return True

    def _set_tomb(self, name: str, tomb: Tomb | None) -> None:
        old = self.tombs.pop(name, None)
        if old is not None:
            for nn in old.pending:
                names = self.tomb_pending.get(nn)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del self.tomb_pending[nn]
        if tomb is not None:
            self.tombs[name] = tomb
            for nn in tomb.pending:
                self.tomb_pending.setdefault(nn, set()).add(name)

    def _gc_tomb(self, name: str, expired: bool = False) -> bool:
        """Drop a tombstone once no node can still hold a deleted copy (or its TTL ran out).
        A name with no version left is then forgotten entirely, version counter included."""
        tomb = self.tombs.get(name)
        if tomb is None or (tomb.pending and not expired):
            return False
        if tomb.pending:
            log.info("tombstone of %s expired with %d node(s) unconfirmed: %s", name, len(tomb.pending),
                     ", ".join(sorted(tomb.pending)[:5]))
        self._set_tomb(name, None)
        if name not in self.files and not self.pending_names[name]:
            self.next_version.pop(name, None)
        return True

    # -- helpers -------------------------------------------------------------------------------
    def _load(self) -> Counter[str]:
        load = Counter[str](self.stored_load)
        for p in self.pending.values():
            load.update(p.replicas)
        return load

    def _place(self, n: int, live: dict[str, str], load: Counter[str], exclude: set[str] = frozenset()) -> list[str]:
        candidates = [node for node in live if node not in exclude]
        random.shuffle(candidates)  # tie-break so equal loads spread
        candidates.sort(key=lambda node: load[node])
        return candidates[:n]

    def _live_replicas(self, v: VersionMeta, live: dict[str, str]) -> list[dict[str, str]]:
        holders = [h for h in v.holders if h in live]
        random.shuffle(holders)  # spread reads
        return [{"node_id": h, "addr": live[h]} for h in holders]

    def _version_view(self, v: VersionMeta, live: dict[str, str]) -> dict[str, Any]:
        return {
            "version": v.version,
            "size": v.size,
            "checksum": v.checksum,
            "mtime": v.mtime,
            "replicas": self._live_replicas(v, live),
        }

    def _readable(self, versions: dict[int, VersionMeta], live: dict[str, str]) -> list[dict[str, Any]]:
        """Views of the readable versions, newest first; [] if the newest one cannot be read (serving
        an older version instead would be a silent stale read)."""
        order = sorted(versions, reverse=True)
        if not order or not any(h in live for h in versions[order[0]].holders):
            return []
        return [self._version_view(versions[n], live) for n in order if any(h in live for h in versions[n].holders)]

    # -- client operations -------------------------------------------------------------------------
    def begin_put(self, files: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        live = self.live_nodes()
        if not live:
            raise MasterError("unavailable", "no storage node is alive")
        n = min(self.cfg.replication_factor, len(live))
        quorum = self.cfg.effective_write_quorum(n)
        load = self._load()
        checked = []
        for f in files:  # validate the whole batch before any version is handed out
            try:
                name = validate_name(f.get("name"), self.cfg.max_name_len)
                size, checksum = int(f["size"]), str(f["checksum"])
            except (BadName, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise MasterError("bad_request", f"bad file entry: {exc}") from None
            if size < 0:
                raise MasterError("bad_request", f"negative size for {name}")
            checked.append((name, size, checksum))
        plans = []
        for name, size, checksum in checked:
            version = self.next_version.get(name, 1)
            self.next_version[name] = version + 1
            replicas = self._place(n, live, load)
            load.update(replicas)
            put = PendingPut(uuid.uuid4().hex, name, version, size, checksum, replicas, quorum, now + PUT_TIMEOUT)
            self.pending[put.put_id] = put
            self.pending_names[name] += 1
            plans.append(
                {
                    "put_id": put.put_id,
                    "name": name,
                    "version": version,
                    "quorum": quorum,
                    "replicas": [{"node_id": r, "addr": live[r]} for r in replicas],
                }
            )
        # The version counter is persisted before anyone writes, so a restart never reuses a version.
        self._changed({p["name"] for p in plans})
        return plans

    def _pop_pending(self, put_id: str) -> PendingPut | None:
        put = self.pending.pop(put_id, None)
        if put is not None:
            self.pending_names[put.name] -= 1
            if self.pending_names[put.name] <= 0:
                del self.pending_names[put.name]
        return put

    def replace_targets(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """New targets for pending puts whose chosen replicas failed (HDFS pipeline recovery)."""
        live = self.live_nodes()
        load = self._load()
        plans = []
        for r in requests:
            if not isinstance(r, dict):
                raise MasterError("bad_request", "bad replacement request: not a map")
            put = self.pending.get(str(r.get("put_id")))
            if put is None:
                raise MasterError("not_found", f"unknown or expired put {str(r.get('put_id'))[:40]!r}")
            try:
                count = max(0, min(int(r.get("count", 1)), self.cfg.replication_factor))
                exclude = {str(x) for x in r.get("exclude", [])} | set(put.replicas)
            except (TypeError, ValueError) as exc:
                raise MasterError("bad_request", f"bad replacement request: {exc}") from None
            new = self._place(count, live, load, exclude=exclude)
            load.update(new)
            put.replicas.extend(new)
            plans.append({
                "put_id": put.put_id, "name": put.name, "version": put.version, "quorum": put.quorum,
                "replicas": [{"node_id": n, "addr": live[n]} for n in new],
            })
        return plans

    def commit_put(self, commits: list[dict[str, Any]], now: float) -> tuple[dict[str, str], Outbox]:
        """Commit puts whose quorum holds; return ({name: why} for failures, outbox)."""
        failed: dict[str, str] = {}
        out: Outbox = []
        changed: set[str] = set()
        live = self.live_nodes()
        for c in commits:
            put = self._pop_pending(str(c.get("put_id")))
            if put is None:
                if str(c.get("put_id")) not in self.committed:
                    failed[str(c.get("put_id"))] = "unknown or expired put"
                continue
            stored = {s for s in c.get("stored", []) if s in put.replicas}
            alive_stored = {s for s in stored if s in live}
            if len(alive_stored) < put.quorum:
                failed[put.name] = (f"write quorum not reached ({len(alive_stored)}/{put.quorum} replicas; "
                                    f"{len(live)} storage nodes alive)")
                out += [(s, Drop(put.name, put.version)) for s in stored]
                continue
            self.committed[put.put_id] = put.name
            while len(self.committed) > 10_000:
                del self.committed[next(iter(self.committed))]
            self._add_version(put.name, VersionMeta(put.version, put.size, put.checksum, time.time(), alive_stored))
            changed.add(put.name)
            self.stats["puts"] += 1
            self.stats["bytes_stored"] += put.size * len(alive_stored)
            out += self._prune(put.name, live)
        self._changed(changed)
        return failed, out

    def _prune(self, name: str, live: dict[str, str]) -> Outbox:
        versions = self.files.get(name, {})
        out: Outbox = []
        for old in sorted(versions)[: max(0, len(versions) - self.cfg.max_versions)]:
            v = self._pop_version(name, old)
            # A holder that is down now drops its copy when it reports back (an old version).
            out += [(h, Drop(name, old)) for h in v.holders if h in live]
        return out

    def locate(self, name: str, count: int) -> list[dict[str, Any]]:
        try:
            validate_name(name, self.cfg.max_name_len)
        except BadName as exc:
            raise MasterError("bad_request", str(exc)) from None
        versions = self.files.get(name)
        if not versions:
            raise MasterError("not_found", f"no such file: {name}")
        live = self.live_nodes()
        readable = self._readable(versions, live)
        if not readable:
            newest = versions[max(versions)]
            raise MasterError("unavailable", f"{name} v{newest.version}: none of its {len(newest.holders)} "
                                             f"replica holders is alive")
        return readable[: max(1, count)]

    def delete(self, name: str) -> tuple[int, Outbox]:
        try:
            validate_name(name, self.cfg.max_name_len)
        except BadName as exc:
            raise MasterError("bad_request", str(exc)) from None
        versions = self.files.get(name)
        if not versions:
            raise MasterError("not_found", f"no such file: {name}")
        live = self.live_nodes()
        # Exact versions, not "every version": a re-put racing this delete must not lose its copy.
        out: Outbox = [(h, Drop(name, v.version)) for v in versions.values() for h in sorted(v.holders) if h in live]
        pending = {node_name(h) for v in versions.values() for h in v.holders}
        old = self.tombs.get(name)
        tomb = Tomb(max(max(versions), old.version if old else 0), pending | (old.pending if old else set()),
                    self.clock())
        count = len(versions)
        self._set_versions(name, None)
        self._set_tomb(name, tomb)
        self._gc_tomb(name)
        self._changed({name})
        self.stats["deletes"] += 1
        return count, out

    def ls(self, pattern: str) -> list[dict[str, Any]]:
        """Every file matching ``pattern`` that can be read now (its newest version has a live replica)."""
        live = self.live_nodes()
        out = []
        for name in sorted(self.files):
            if match(pattern, name):
                readable = self._readable(self.files[name], live)
                if readable:
                    out.append({"name": name, "versions": readable})
        return out

    def info(self) -> dict[str, Any]:
        live = self.live_nodes()
        target = min(self.cfg.replication_factor, len(live)) if live else 0
        under = unavailable = 0
        for vs in self.files.values():
            for v in vs.values():
                n = sum(1 for h in v.holders if h in live)
                under += n < target
                unavailable += n == 0
        return {
            "files": len(self.files),
            "versions": sum(len(v) for v in self.files.values()),
            "bytes": sum(v.size for vs in self.files.values() for v in vs.values()),
            "replication_factor": self.cfg.replication_factor,
            "under_replicated": under,
            "unavailable": unavailable,
            "tombstones": len(self.tombs),
            "repairs_in_progress": len(self.repairs),
            "load": {n: c for n, c in self._load().items() if n in live},
            **dict(self.stats),
        }

    # -- node events -------------------------------------------------------------------------------
    def node_down(self, node_id: str) -> None:
        """The node is gone for now. Its copies stay in the metadata (it may come back with its disk:
        its report will say what it still has); every version it held is checked for repair."""
        for key in self.held.get(node_name(node_id), ()):
            self.dirty[key] = None
        self.repairs = {k: d for k, d in self.repairs.items() if k[2] != node_id}

    def node_report(self, node_id: str, store: list[list[Any]]) -> Outbox:
        """A node (re)joined with its replicas: its report is the truth about what it holds. Adopt
        what matches, drop what is stale or deleted, forget copies it no longer has."""
        out: Outbox = []
        changed: set[str] = set()
        me = node_name(node_id)
        reported: dict[Key, tuple[int, str]] = {}
        for item in store:
            try:
                name, version, size, checksum = str(item[0]), int(item[1]), int(item[2]), str(item[3])
                if name not in self.next_version:  # a known name was validated when it was created
                    validate_name(name)
            except (BadName, IndexError, TypeError, ValueError):
                continue
            if version < 1:
                continue  # Drop(name, 0) would mean "every version": never send it for a bogus report
            reported[(name, version)] = (size, checksum)

        # 1. What the metadata says this node (any incarnation of it) holds, against what it has.
        older = any(i != node_id and node_name(i) == me for i in self.stored_load)  # earlier incarnations
        # A re-attach (failover, same incarnation) needs only what it no longer reports; mismatching
        # copies are handled with every reported item below.
        check = list(self.held.get(me, ())) if older else list(self.held.get(me, set()) - reported.keys())
        for name, version in check:
            v = self.files[name][version]
            has = reported.get((name, version)) == (v.size, v.checksum)
            moved = False
            for h in [h for h in v.holders if node_name(h) == me]:
                if h != node_id or not has:
                    moved |= self._remove_holder(name, v, h)
            if has:
                moved |= self._add_holder(name, v, node_id)
            if moved:  # a rejoin that changes nothing writes nothing (a big store is not re-journaled)
                changed.add(name)
            self._drop_if_unheld(name, v, me)

        # 2. Tombstones waiting for this node: a report without the deleted copy confirms the delete.
        waiting = self.tomb_pending.get(me)
        if waiting:
            oldest: dict[str, int] = {}
            for name, version in reported:
                if name in waiting:
                    oldest[name] = min(version, oldest.get(name, version))
            for name in list(waiting):
                tomb = self.tombs[name]
                if oldest.get(name, tomb.version + 1) > tomb.version:
                    self._set_tomb(name, Tomb(tomb.version, tomb.pending - {me}, tomb.at))
                    self._gc_tomb(name)
                    changed.add(name)

        # 3. Every reported copy.
        pending = {(p.name, p.version) for p in self.pending.values()}
        files = self.files
        for (name, version), (size, checksum) in reported.items():
            versions = files.get(name)
            v = versions.get(version) if versions else None
            if v is not None:
                if v.checksum == checksum and size == v.size:
                    if node_id not in v.holders:
                        self._add_holder(name, v, node_id)
                        changed.add(name)
                else:
                    out.append((node_id, Drop(name, version)))
                    if self._remove_holder(name, v, node_id):
                        changed.add(name)
                        self._drop_if_unheld(name, v, me)
                continue
            tomb = self.tombs.get(name)
            if tomb is not None and version <= tomb.version:
                log.info("%s v%d on %s was deleted while it was away: dropped", name, version, node_id)
                out.append((node_id, Drop(name, version)))
            elif name in self.next_version and version < self.next_version[name]:
                # Known name, version pruned (or its put failed) while the node was away.
                if (name, version) not in pending:
                    out.append((node_id, Drop(name, version)))
            else:
                # Unknown to this master (rebuilding metadata from the nodes): adopt it.
                self._add_version(name, VersionMeta(version, size, checksum, time.time(), {node_id}))
                self.next_version[name] = max(self.next_version.get(name, 1), version + 1)
                changed.add(name)
                out += self._prune(name, self.live_nodes())
        self._changed(changed)
        return out

    def _drop_if_unheld(self, name: str, v: VersionMeta, me: str) -> None:
        if not v.holders:
            log.warning("%s v%d: metadata listed a replica on %s, which does not have it, and no other "
                        "holder; entry dropped (no readable replica)", name, v.version, me)
            self._pop_version(name, v.version)
            self.stats["dropped_unreadable"] += 1

    def stored(self, node_id: str, name: str, version: int, ok: bool, checksum: str) -> Outbox:
        self.repairs.pop((name, version, node_id), None)
        self.dirty[(name, version)] = None  # done or failed: the next tick checks it again
        v = self.files.get(name, {}).get(version)
        if not ok or node_id not in self.live_nodes():
            return []
        if v is None or v.checksum != checksum:
            return [(node_id, Drop(name, version))]
        self._add_holder(name, v, node_id)
        self.stats["re_replications"] += 1
        self.stats["bytes_replicated"] += v.size
        self._changed({name})
        return []

    def report_bad(self, node_id: str, name: str, version: int) -> Outbox:
        v = self.files.get(name, {}).get(version)
        if v is None or node_id not in v.holders:
            return []
        live = self.live_nodes()
        if not any(h in live for h in v.holders if h != node_id):
            # Never destroy the last live copy on one reader's word: it may be the reader that is broken.
            log.warning("replica of %s v%d on %s reported bad, but it is the last live copy; kept", name, version,
                        node_id)
            return []
        log.warning("replica of %s v%d on %s reported bad; repairing", name, version, node_id)
        self._remove_holder(name, v, node_id)
        self.stats["bad_replicas"] += 1
        self._changed({name})
        # Drop first, then repair() may place a fresh copy on the same node (same channel, same order).
        return [(node_id, Drop(name, version))]

    def _expire_tombs(self) -> None:
        cutoff = self.clock() - self.cfg.tombstone_ttl
        expired = []
        for name, tomb in self.tombs.items():  # deletion order: stop at the first one still young
            if tomb.at > cutoff:
                break
            expired.append(name)
        for name in expired:
            self._gc_tomb(name, expired=True)
        self._changed(expired)

    def repair(self, now: float) -> Outbox:
        """Re-replicate versions below min(RF, live nodes) from their surviving holders.

        Only versions marked dirty (a holder went down, a copy failed, metadata was loaded, the target
        grew) are examined, at most MAX_CHECKS_PER_TICK per call: the cost of a tick does not grow
        with the namespace.
        """
        for pid in [pid for pid, p in self.pending.items() if p.deadline < now]:
            self._pop_pending(pid)
        self._expire_tombs()
        if self.loaded:
            # Started from metadata on disk (a whole-cluster restart): give the nodes a failure
            # timeout to rejoin and report before copying anything, instead of re-replicating onto
            # the first node to arrive what the others are about to report.
            self.loaded = False
            self.settle_until = now + self.cfg.failure_timeout
        if self.settle_until is not None and now < self.settle_until:
            return []
        live = self.live_nodes()
        if not live:
            return []
        for k, d in list(self.repairs.items()):
            if d <= now or k[2] not in live:
                del self.repairs[k]
                self.dirty[(k[0], k[1])] = None
        target_n = min(self.cfg.replication_factor, len(live))
        if target_n > self.last_target:  # more nodes than before: every version may be short of copies
            for name, versions in self.files.items():
                for version in versions:
                    self.dirty[(name, version)] = None
        self.last_target = target_n
        if not self.dirty:
            return []
        load = self._load()
        out: Outbox = []
        in_progress_by_version: dict[Key, set[str]] = {}
        for name, version, node in self.repairs:
            in_progress_by_version.setdefault((name, version), set()).add(node)
        budget = MAX_REPAIRS_IN_FLIGHT - len(self.repairs)  # throttle, as HDFS limits replication work
        done: list[Key] = []
        checks = 0
        for key in self.dirty:
            if budget <= 0 or checks >= MAX_CHECKS_PER_TICK:
                break
            checks += 1
            name, version = key
            v = self.files.get(name, {}).get(version)
            if v is None:
                done.append(key)
                continue
            holders = [h for h in v.holders if h in live]
            in_progress = in_progress_by_version.get(key, set())
            if not holders:
                done.append(key)  # nothing to copy from; a holder's return marks it again
                continue
            missing = target_n - len(holders) - len(in_progress)
            if missing <= 0:
                if not in_progress:
                    done.append(key)
                    if len(holders) >= self.cfg.replication_factor and len(holders) < len(v.holders):
                        # Fully replicated on live nodes: forget copies on nodes that are down (if one
                        # comes back with its copy, its report adds it again).
                        for h in [h for h in v.holders if h not in live]:
                            self._remove_holder(name, v, h)
                        self._changed({name})
                continue
            budget -= missing
            targets = self._place(missing, live, load, exclude=set(holders) | in_progress)
            for t in targets:
                load[t] += 1
                self.repairs[(name, version, t)] = now + REPAIR_TIMEOUT
                out.append((t, Replicate(name, version, v.size, v.checksum, [live[h] for h in holders])))
            if not targets:
                done.append(key)  # no node to copy to; a join raises the target and marks it again
        for key in done:
            self.dirty.pop(key, None)
        return out

    def under_replicated(self) -> int:
        live = self.live_nodes()
        target = min(self.cfg.replication_factor, len(live)) if live else 0
        return sum(
            1 for vs in self.files.values() for v in vs.values() if len([h for h in v.holders if h in live]) < target
        )
