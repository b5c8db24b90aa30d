"""The write path of the master: puts in flight, from version assignment to quorum commit.

``begin`` hands out versions (the master is the single authority, so concurrent puts get distinct
monotonic versions) and targets; ``replace_targets`` gives new targets to a put whose chosen
replicas failed (HDFS pipeline recovery); ``commit`` records the version once its write quorum
holds and prunes old versions. A put that never commits expires after PUT_TIMEOUT. It is its own
part because its state (puts in flight, their reserved targets, recently committed ids) lives only
between a client's begin and commit, and never reaches the persisted namespace until a commit.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from common.config import Config
from common.protocol import Drop
from sdfs.errors import MasterError
from sdfs.names import BadName, validate_name
from sdfs.placement import place
from sdfs.table import FileTable, Key, Outbox, VersionMeta

PUT_TIMEOUT = 600.0
COMMITTED_KEPT = 10_000  # recent put ids remembered so that a retried commit is not an error


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


class PendingPuts:
    """Puts between begin and commit: their versions, targets and quorum, and recent commits."""

    def __init__(self, table: FileTable, cfg: Config, live_nodes: Callable[[], dict[str, str]],
                 changed: Callable[[Iterable[str]], None], stats: Counter[str]) -> None:
        self.table = table
        self.cfg = cfg
        self.live_nodes = live_nodes
        self.changed = changed
        self.stats = stats
        self.pending: dict[str, PendingPut] = {}
        self.committed: dict[str, str] = {}  # recent put ids -> name: a retried commit is not an error

    def load(self) -> Counter[str]:
        """Replicas per node, counting the targets of puts in flight (placement spreads by it)."""
        load = Counter[str](self.table.stored_load)
        for p in self.pending.values():
            load.update(p.replicas)
        return load

    def keys(self) -> set[Key]:
        """(name, version) of every put in flight: its copies on nodes are not stale yet."""
        return {(p.name, p.version) for p in self.pending.values()}

    def _pop(self, put_id: str) -> PendingPut | None:
        put = self.pending.pop(put_id, None)
        if put is not None:
            self.table.release_version(put.name)
        return put

    def expire(self, now: float) -> None:
        for pid in [pid for pid, p in self.pending.items() if p.deadline < now]:
            self._pop(pid)

    def _check_files(self, files: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
        """Validate the whole batch before any version is handed out."""
        checked = []
        for f in files:
            try:
                name = validate_name(f.get("name"), self.cfg.max_name_len)
                size, checksum = int(f["size"]), str(f["checksum"])
            except (BadName, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise MasterError("bad_request", f"bad file entry: {exc}") from None
            if size < 0:
                raise MasterError("bad_request", f"negative size for {name}")
            checked.append((name, size, checksum))
        return checked

    def begin(self, files: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        live = self.live_nodes()
        if not live:
            raise MasterError("unavailable", "no storage node is alive")
        n = min(self.cfg.replication_factor, len(live))
        quorum = self.cfg.effective_write_quorum(n)
        load = self.load()
        checked = self._check_files(files)
        plans = []
        for name, size, checksum in checked:
            version = self.table.reserve_version(name)
            replicas = place(n, live, load)
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
        self.changed({p["name"] for p in plans})
        return plans

    def replace_targets(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """New targets for pending puts whose chosen replicas failed (HDFS pipeline recovery)."""
        live = self.live_nodes()
        load = self.load()
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
            new = place(count, live, load, exclude=exclude)
            load.update(new)
            put.replicas.extend(new)
            plans.append({
                "put_id": put.put_id, "name": put.name, "version": put.version, "quorum": put.quorum,
                "replicas": [{"node_id": n, "addr": live[n]} for n in new],
            })
        return plans

    def commit(self, commits: list[dict[str, Any]], now: float) -> tuple[dict[str, str], Outbox]:
        """Commit puts whose quorum holds; return ({name: why} for failures, outbox)."""
        failed: dict[str, str] = {}
        out: Outbox = []
        changed: set[str] = set()
        live = self.live_nodes()
        for c in commits:
            put = self._pop(str(c.get("put_id")))
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
            self._commit_one(put, alive_stored)
            changed.add(put.name)
            out += self.table.prune(put.name, self.cfg.max_versions, live)
        self.changed(changed)
        return failed, out

    def _commit_one(self, put: PendingPut, holders: set[str]) -> None:
        self.committed[put.put_id] = put.name
        while len(self.committed) > COMMITTED_KEPT:
            del self.committed[next(iter(self.committed))]
        self.table.add_version(put.name, VersionMeta(put.version, put.size, put.checksum, time.time(), holders))
        self.stats["puts"] += 1
        self.stats["bytes_stored"] += put.size * len(holders)
