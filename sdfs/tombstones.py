"""Deletes and their tombstones: a deleted file stays deleted even on nodes that missed the delete.

A delete removes the file's versions at once and leaves a tombstone: the newest deleted version and
the names of the nodes that held a copy. A node's later store report that no longer lists a deleted
copy confirms the delete for that node; a report that still lists one gets the copy dropped (never
resurrected). A tombstone is forgotten once every node confirmed, or when ``tombstone_ttl`` runs out
(a node gone for that long is not coming back with its disk). This is its own part because its
rules (what confirms, when a name and its version counter may be forgotten) are subtle and apply
across deletes, node reports and the repair tick; see docs/sdfs.md.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable

from common.identity import node_name
from common.protocol import Drop
from sdfs.table import FileTable, Key, Outbox, Tomb

log = logging.getLogger("idunno.sdfs.master")


class Tombstones:
    """Deletes, tombstone confirmation by node reports, and tombstone expiry, over a FileTable."""

    def __init__(self, table: FileTable, ttl: float, changed: Callable[[Iterable[str]], None],
                 stats: Counter[str], clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self.ttl = ttl
        self.changed = changed
        self.stats = stats
        self.clock = clock  # wall clock: tombstone ages are replicated, so not monotonic time

    def delete(self, name: str, live: dict[str, str]) -> tuple[int, Outbox]:
        """Delete every version of an existing file; return (versions deleted, drops for live holders)."""
        t = self.table
        versions = t.files[name]
        # Exact versions, not "every version": a re-put racing this delete must not lose its copy.
        out: Outbox = [(h, Drop(name, v.version)) for v in versions.values() for h in sorted(v.holders) if h in live]
        pending = {node_name(h) for v in versions.values() for h in v.holders}
        old = t.tombs.get(name)
        tomb = Tomb(max(max(versions), old.version if old else 0), pending | (old.pending if old else set()),
                    self.clock())
        count = len(versions)
        t.set_versions(name, None)
        t.set_tomb(name, tomb)
        self.gc(name)
        self.changed({name})
        self.stats["deletes"] += 1
        return count, out

    def gc(self, name: str, expired: bool = False) -> bool:
        """Drop a tombstone once no node can still hold a deleted copy (or its TTL ran out).
        A name with no version left is then forgotten entirely, version counter included."""
        t = self.table
        tomb = t.tombs.get(name)
        if tomb is None or (tomb.pending and not expired):
            return False
        if tomb.pending:
            log.info("tombstone of %s expired with %d node(s) unconfirmed: %s", name, len(tomb.pending),
                     ", ".join(sorted(tomb.pending)[:5]))
        t.set_tomb(name, None)
        if name not in t.files and not t.pending_names[name]:
            t.next_version.pop(name, None)
        return True

    def expire(self) -> None:
        """Forget the tombstones older than the TTL, oldest first."""
        cutoff = self.clock() - self.ttl
        expired = []
        for name, tomb in self.table.tombs.items():  # deletion order: stop at the first one still young
            if tomb.at > cutoff:
                break
            expired.append(name)
        for name in expired:
            self.gc(name, expired=True)
        self.changed(expired)

    def confirm(self, me: str, reported: dict[Key, tuple[int, str]]) -> set[str]:
        """Node ``me`` reported its store: each tombstone waiting for it whose deleted versions are
        not in the report is confirmed. Returns the names whose entries changed."""
        t = self.table
        waiting = t.tomb_pending.get(me)
        if not waiting:
            return set()
        changed = set()
        oldest: dict[str, int] = {}
        for name, version in reported:
            if name in waiting:
                oldest[name] = min(version, oldest.get(name, version))
        for name in list(waiting):
            tomb = t.tombs[name]
            if oldest.get(name, tomb.version + 1) > tomb.version:
                t.set_tomb(name, Tomb(tomb.version, tomb.pending - {me}, tomb.at))
                self.gc(name)
                changed.add(name)
        return changed

    def buries(self, name: str, version: int) -> bool:
        """Whether ``version`` of ``name`` was deleted (a reported copy of it must be dropped)."""
        tomb = self.table.tombs.get(name)
        return tomb is not None and version <= tomb.version
