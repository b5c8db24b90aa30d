"""The SDFS metadata master (hosted by the coordinator).

It owns file -> versions -> replica nodes, assigns versions (the single authority, so concurrent
puts get distinct monotonic versions), chooses placements, commits a version only when its write
quorum holds, re-replicates under-replicated versions and prunes old ones. It never touches file
data: it answers with plans and returns the commands nodes must run as an outbox of
``(node_id, Message)``. Every change of a file is persisted (SQLite) and announced to ``journal``
(the coordinator replicates it to the standby) as one idempotent record: the file's whole entry.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.config import Config
from common.protocol import Drop, Message, Replicate
from sdfs.names import BadName, match, validate_name

log = logging.getLogger("idunno.sdfs.master")

Outbox = list[tuple[str, Message]]
PUT_TIMEOUT = 600.0
REPAIR_TIMEOUT = 60.0
MAX_REPAIRS_IN_FLIGHT = 512


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
    holders: set[str] = field(default_factory=set)

    def record(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "size": self.size,
            "checksum": self.checksum,
            "mtime": self.mtime,
            "holders": sorted(self.holders),
        }


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
    ) -> None:
        self.cfg = cfg
        self.live_nodes = live_nodes  # node_id -> data addr of every alive storage node
        self.journal = journal or (lambda op, data: None)
        self.files: dict[str, dict[int, VersionMeta]] = {}
        self.next_version: dict[str, int] = {}
        self.pending: dict[str, PendingPut] = {}
        self.repairs: dict[tuple[str, int, str], float] = {}
        self.committed: dict[str, str] = {}  # recent put ids -> name: a retried commit is not an error
        self.stats = Counter[str]()
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
        log.info("loaded metadata of %d files from %s", len(self.files), path)

    def entry(self, name: str) -> dict[str, Any]:
        return {
            "next_version": self.next_version.get(name, 1),
            "versions": [v.record() for v in self.files.get(name, {}).values()],
        }

    def _load_entry(self, name: str, entry: dict[str, Any]) -> None:
        self.next_version[name] = int(entry.get("next_version", 1))
        versions = {
            int(r["version"]): VersionMeta(
                int(r["version"]), int(r["size"]), str(r["checksum"]), float(r["mtime"]), set(r["holders"])
            )
            for r in entry.get("versions", [])
        }
        if versions:
            self.files[name] = versions
        else:
            self.files.pop(name, None)

    def _changed(self, names: set[str]) -> None:
        """Persist and journal the whole entry of every changed file (idempotent records)."""
        if not names:
            return
        entries = {n: self.entry(n) for n in names}
        self._persist(entries)
        self.journal("sdfs.files", {"entries": entries})

    def _persist(self, entries: dict[str, dict[str, Any]]) -> None:
        if self.db is None:
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR REPLACE INTO files (name, entry) VALUES (?, ?)",
                [(n, json.dumps(e)) for n, e in entries.items()],
            )

    # replication from the primary (standby side) and snapshots
    def apply_entries(self, entries: dict[str, dict[str, Any]]) -> None:
        for name, e in entries.items():
            self._load_entry(name, e)
        self._persist(entries)

    def snapshot(self) -> dict[str, Any]:
        names = set(self.files) | set(self.next_version)
        return {"entries": {n: self.entry(n) for n in names}}

    # -- helpers -------------------------------------------------------------------------------
    def _load(self) -> Counter[str]:
        load = Counter[str]()
        for versions in self.files.values():
            for v in versions.values():
                load.update(v.holders)
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
            put = self.pending.pop(str(c.get("put_id")), None)
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
            versions = self.files.setdefault(put.name, {})
            versions[put.version] = VersionMeta(put.version, put.size, put.checksum, time.time(), alive_stored)
            changed.add(put.name)
            self.stats["puts"] += 1
            self.stats["bytes_stored"] += put.size * len(alive_stored)
            out += self._prune(put.name)
        self._changed(changed)
        return failed, out

    def _prune(self, name: str) -> Outbox:
        versions = self.files.get(name, {})
        out: Outbox = []
        for old in sorted(versions)[: max(0, len(versions) - self.cfg.max_versions)]:
            v = versions.pop(old)
            out += [(h, Drop(name, old)) for h in v.holders]
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
        newest = sorted(versions, reverse=True)[: max(1, count)]
        return [self._version_view(versions[v], live) for v in newest]

    def delete(self, name: str) -> tuple[int, Outbox]:
        try:
            validate_name(name, self.cfg.max_name_len)
        except BadName as exc:
            raise MasterError("bad_request", str(exc)) from None
        versions = self.files.pop(name, None)
        if not versions:
            raise MasterError("not_found", f"no such file: {name}")
        holders = set().union(*(v.holders for v in versions.values()))
        self._changed({name})
        return len(versions), [(h, Drop(name, 0)) for h in holders]

    def ls(self, pattern: str) -> list[dict[str, Any]]:
        live = self.live_nodes()
        out = []
        for name in sorted(self.files):
            if match(pattern, name):
                versions = self.files[name]
                out.append(
                    {
                        "name": name,
                        "versions": [self._version_view(versions[v], live) for v in sorted(versions, reverse=True)],
                    }
                )
        return out

    def info(self) -> dict[str, Any]:
        under = self.under_replicated()
        return {
            "files": len(self.files),
            "versions": sum(len(v) for v in self.files.values()),
            "bytes": sum(v.size for vs in self.files.values() for v in vs.values()),
            "replication_factor": self.cfg.replication_factor,
            "under_replicated": under,
            "repairs_in_progress": len(self.repairs),
            "load": dict(self._load()),
            **dict(self.stats),
        }

    # -- node events -------------------------------------------------------------------------------
    def node_down(self, node_id: str) -> None:
        changed = {name for name, vs in self.files.items() if any(node_id in v.holders for v in vs.values())}
        for name in changed:
            for v in self.files[name].values():
                v.holders.discard(node_id)
        self.repairs = {k: d for k, d in self.repairs.items() if k[2] != node_id}
        self._changed(changed)

    def node_report(self, node_id: str, store: list[list[Any]]) -> Outbox:
        """A node (re)joined with its replicas: adopt what matches, drop what is stale."""
        out: Outbox = []
        changed: set[str] = set()
        for item in store:
            try:
                name, version, size, checksum = str(item[0]), int(item[1]), int(item[2]), str(item[3])
                validate_name(name)
            except (BadName, IndexError, TypeError, ValueError):
                continue
            if version < 1:
                continue  # Drop(name, 0) would mean "every version": never send it for a bogus report
            versions = self.files.get(name, {})
            v = versions.get(version)
            if v is not None:
                if v.checksum == checksum and size == v.size:
                    if node_id not in v.holders:
                        v.holders.add(node_id)
                        changed.add(name)
                else:
                    out.append((node_id, Drop(name, version)))
            elif name in self.next_version and version < self.next_version[name]:
                # Known name, version deleted or pruned while the node was away.
                if not any(p.name == name and p.version == version for p in self.pending.values()):
                    out.append((node_id, Drop(name, version)))
            else:
                # Unknown to this master (rebuilding metadata from the nodes): adopt it.
                self.files.setdefault(name, {})[version] = VersionMeta(version, size, checksum, time.time(), {node_id})
                self.next_version[name] = max(self.next_version.get(name, 1), version + 1)
                changed.add(name)
                out += self._prune(name)
        self._changed(changed)
        return out

    def stored(self, node_id: str, name: str, version: int, ok: bool, checksum: str) -> Outbox:
        self.repairs.pop((name, version, node_id), None)
        v = self.files.get(name, {}).get(version)
        if not ok or node_id not in self.live_nodes():
            return []
        if v is None or v.checksum != checksum:
            return [(node_id, Drop(name, version))]
        v.holders.add(node_id)
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
        v.holders.discard(node_id)
        self.stats["bad_replicas"] += 1
        self._changed({name})
        # Drop first, then repair() may place a fresh copy on the same node (same channel, same order).
        return [(node_id, Drop(name, version))]

    def repair(self, now: float) -> Outbox:
        """Re-replicate every version below min(RF, live nodes) from its surviving holders."""
        live = self.live_nodes()
        if not live:
            return []
        self.repairs = {k: d for k, d in self.repairs.items() if d > now and k[2] in live}
        for pid, p in list(self.pending.items()):
            if p.deadline < now:
                del self.pending[pid]
        target_n = min(self.cfg.replication_factor, len(live))
        load = self._load()
        out: Outbox = []
        in_progress_by_version: dict[tuple[str, int], set[str]] = {}
        for name, version, node in self.repairs:
            in_progress_by_version.setdefault((name, version), set()).add(node)
        budget = MAX_REPAIRS_IN_FLIGHT - len(self.repairs)  # throttle, as HDFS limits replication work
        for name, versions in self.files.items():
            for v in versions.values():
                if budget <= 0:
                    return out
                holders = [h for h in v.holders if h in live]
                in_progress = in_progress_by_version.get((name, v.version), set())
                missing = target_n - len(holders) - len(in_progress)
                if missing <= 0 or not holders:
                    continue
                budget -= missing
                targets = self._place(missing, live, load, exclude=set(holders) | in_progress)
                for t in targets:
                    load[t] += 1
                    self.repairs[(name, v.version, t)] = now + REPAIR_TIMEOUT
                    out.append((t, Replicate(name, v.version, v.size, v.checksum, [live[h] for h in holders])))
        return out

    def under_replicated(self) -> int:
        live = self.live_nodes()
        target = min(self.cfg.replication_factor, len(live)) if live else 0
        return sum(
            1 for vs in self.files.values() for v in vs.values() if len([h for h in v.holders if h in live]) < target
        )
