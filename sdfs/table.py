"""The SDFS namespace: file -> versions -> holders, version counters, tombstones, and their indexes.

This is the master's in-memory state and nothing else: no placement, no repair policy, no SQL.
It is its own part because of one invariant every other part relies on: the indexes (which
versions a node holds, how many replicas each node stores, which tombstones wait for a node,
which versions may need a repair) are always in step with the holder sets. Every change of a
holder set, a version or a tombstone goes through the methods here, which update the indexes in
the same step, so no per-tick or per-event path ever has to walk the whole namespace.

An *entry* (``entry()``/``load_entry()``) is the whole state of one name as a plain dict: the unit
that is persisted, journalled to the standby and carried in snapshots.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from common.identity import node_name
from common.protocol import Drop, Message

Outbox = list[tuple[str, Message]]  # (node id, command) pairs the coordinator sends
Key = tuple[str, int]  # (file name, version)


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


def is_empty(entry: dict[str, Any]) -> bool:
    """An entry that carries nothing worth remembering: its row is deleted."""
    return not entry.get("versions") and not entry.get("tomb") and int(entry.get("next_version", 1)) <= 1


class FileTable:
    """The namespace plus the indexes kept in step with it (see the module docstring)."""

    def __init__(self) -> None:
        self.files: dict[str, dict[int, VersionMeta]] = {}
        self.next_version: dict[str, int] = {}
        self.tombs: dict[str, Tomb] = {}  # insertion order = deletion order (the TTL sweep pops the front)
        # Versions handed out to puts still in flight, per name: such a name keeps its version
        # counter even when it has no version and no tombstone left (a restart never reuses one).
        self.pending_names = Counter[str]()
        # Indexes: node name -> versions it holds, node id -> replica count (placement load),
        # node name -> tombstones waiting for it, versions that may need a repair.
        self.held: dict[str, set[Key]] = {}
        self.stored_load = Counter[str]()
        self.tomb_pending: dict[str, set[str]] = {}
        self.dirty: dict[Key, None] = {}  # an ordered set

    def names(self) -> set[str]:
        """Every name with something to remember (versions, a counter or a tombstone)."""
        return set(self.files) | set(self.next_version) | set(self.tombs)

    # -- entries (the persisted / replicated form) -----------------------------------------------
    def entry(self, name: str) -> dict[str, Any]:
        e: dict[str, Any] = {
            "next_version": self.next_version.get(name, 1),
            "versions": [v.record() for v in self.files.get(name, {}).values()],
        }
        tomb = self.tombs.get(name)
        if tomb is not None:
            e["tomb"] = tomb.record()
        return e

    def load_entry(self, name: str, entry: dict[str, Any]) -> None:
        versions = {
            int(r["version"]): VersionMeta(
                int(r["version"]), int(r["size"]), str(r["checksum"]), float(r["mtime"]), set(r["holders"])
            )
            for r in entry.get("versions", [])
        }
        self.set_versions(name, versions or None)
        t = entry.get("tomb")
        self.set_tomb(name, Tomb(int(t["version"]), set(t["pending"]), float(t["at"])) if t else None)
        if is_empty(entry):
            self.next_version.pop(name, None)
        else:
            self.next_version[name] = int(entry.get("next_version", 1))

    def clear(self) -> None:
        """Forget every name (a standby's full sync replaces the whole namespace)."""
        for name in list(set(self.files) | set(self.tombs)):
            self.set_versions(name, None)
            self.set_tomb(name, None)
        self.next_version.clear()

    # -- version counters --------------------------------------------------------------------------
    def reserve_version(self, name: str) -> int:
        """Hand out the next version of ``name`` to a put (released by ``release_version``)."""
        version = self.next_version.get(name, 1)
        self.next_version[name] = version + 1
        self.pending_names[name] += 1
        return version

    def release_version(self, name: str) -> None:
        self.pending_names[name] -= 1
        if self.pending_names[name] <= 0:
            del self.pending_names[name]

    # -- versions and holders ----------------------------------------------------------------------
    def _index(self, name: str, v: VersionMeta) -> None:
        for h in v.holders:
            self.held.setdefault(node_name(h), set()).add((name, v.version))
            self.stored_load[h] += 1
        self.dirty[(name, v.version)] = None

    def _unindex(self, name: str, v: VersionMeta) -> None:
        """Forget the whole version: every holder's load, and the version under every node name.
        (Not one holder at a time: with two incarnations of a node among the holders, each would
        see the other still holding it, and the version would stay listed under the name.)"""
        for h in v.holders:
            self.stored_load[h] -= 1
            if self.stored_load[h] <= 0:
                del self.stored_load[h]
        key = (name, v.version)
        for nn in {node_name(h) for h in v.holders}:
            keys = self.held.get(nn)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.held[nn]

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

    def set_versions(self, name: str, versions: dict[int, VersionMeta] | None) -> None:
        for v in self.files.pop(name, {}).values():
            self._unindex(name, v)
        if versions:
            self.files[name] = versions
            for v in versions.values():
                self._index(name, v)

    def add_version(self, name: str, v: VersionMeta) -> None:
        self.files.setdefault(name, {})[v.version] = v
        self._index(name, v)

    def pop_version(self, name: str, version: int) -> VersionMeta | None:
        versions = self.files.get(name)
        v = versions.pop(version, None) if versions else None
        if v is not None:
            self._unindex(name, v)
            if not versions:
                del self.files[name]
        return v

    def add_holder(self, name: str, v: VersionMeta, node_id: str) -> bool:
        if node_id in v.holders:
            return False
        v.holders.add(node_id)
        self.stored_load[node_id] += 1
        self.held.setdefault(node_name(node_id), set()).add((name, v.version))
        self.dirty[(name, v.version)] = None
        return True

    def remove_holder(self, name: str, v: VersionMeta, node_id: str) -> bool:
        if node_id not in v.holders:
            return False
        self._unindex_holder(name, v, node_id)  # before the discard: it looks for other ids of the name
        v.holders.discard(node_id)
        self.dirty[(name, v.version)] = None
        return True

    def prune(self, name: str, keep: int, live: dict[str, str]) -> Outbox:
        """Forget all but the newest ``keep`` versions; drop their copies on the live holders."""
        versions = self.files.get(name, {})
        out: Outbox = []
        for old in sorted(versions)[: max(0, len(versions) - keep)]:
            v = self.pop_version(name, old)
            # A holder that is down now drops its copy when it reports back (an old version).
            out += [(h, Drop(name, old)) for h in v.holders if h in live]
        return out

    # -- tombstones --------------------------------------------------------------------------------
    def set_tomb(self, name: str, tomb: Tomb | None) -> None:
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
