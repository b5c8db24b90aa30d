"""Reconciling the metadata with what nodes and readers report about their replicas.

A node's store report (sent when it joins, rejoins under a new incarnation or re-attaches to a new
primary) is the truth about that node. Holders are node ids (``name@incarnation``) but a node's
*name* is its stable identity (its data directory), so a node back under a new incarnation replaces
its old incarnation as holder. Against a report:

1. a version the metadata says the node holds but it does not report (or reports with another size
   or checksum) is no longer held there, and a version left with no holder at all is dropped
   (stale metadata never serves a file nobody has);
2. tombstones waiting for the node are confirmed when the deleted copies are gone (sdfs/tombstones.py);
3. each reported copy is adopted if it matches a known version, dropped if it is corrupt, deleted,
   pruned or from a failed put, and adopted as a new version if the master never heard of it
   (metadata rebuilt from the nodes).

A reader's report of a bad replica removes that holder unless it is the last live copy. This is its
own part because it is the one place where the master's view is corrected from the outside.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from common.config import Config
from common.identity import node_name
from common.protocol import Drop
from sdfs.names import BadName, validate_name
from sdfs.table import FileTable, Key, Outbox, VersionMeta
from sdfs.tombstones import Tombstones

log = logging.getLogger("idunno.sdfs.master")

Reported = dict[Key, tuple[int, str]]  # (name, version) -> (size, checksum)


def parse_store(store: list[list[Any]], known: dict[str, int]) -> Reported:
    """The valid items of a store report. Malformed items are skipped: a node's bad report must not
    cost the others; a name in ``known`` was validated when it was created."""
    reported: Reported = {}
    for item in store:
        try:
            name, version, size, checksum = str(item[0]), int(item[1]), int(item[2]), str(item[3])
            if name not in known:
                validate_name(name)
        except (BadName, IndexError, TypeError, ValueError):
            continue
        if version < 1:
            continue  # Drop(name, 0) would mean "every version": never send it for a bogus report
        reported[(name, version)] = (size, checksum)
    return reported


class NodeReports:
    """Applies node store reports and readers' bad-replica reports to a FileTable."""

    def __init__(self, table: FileTable, tombstones: Tombstones, cfg: Config,
                 live_nodes: Callable[[], dict[str, str]], in_flight: Callable[[], set[Key]],
                 changed: Callable[[Iterable[str]], None], stats: Counter[str]) -> None:
        self.table = table
        self.tombstones = tombstones
        self.cfg = cfg
        self.live_nodes = live_nodes
        self.in_flight = in_flight  # (name, version) of puts in flight: their copies are not stale
        self.changed = changed
        self.stats = stats

    def node_report(self, node_id: str, store: list[list[Any]]) -> Outbox:
        """A node (re)joined with its replicas: its report is the truth about what it holds. Adopt
        what matches, drop what is stale or deleted, forget copies it no longer has."""
        me = node_name(node_id)
        reported = parse_store(store, self.table.next_version)
        changed: set[str] = set()
        self._reconcile_held(node_id, me, reported, changed)
        changed |= self.tombstones.confirm(me, reported)
        out = self._take_reported(node_id, me, reported, changed)
        self.changed(changed)
        return out

    def _reconcile_held(self, node_id: str, me: str, reported: Reported, changed: set[str]) -> None:
        """What the metadata says this node (any incarnation of it) holds, against what it has."""
        t = self.table
        older = any(i != node_id and node_name(i) == me for i in t.stored_load)  # earlier incarnations
        # A re-attach (failover, same incarnation) needs only what it no longer reports; mismatching
        # copies are handled with every reported item in _take_reported.
        check = list(t.held.get(me, ())) if older else list(t.held.get(me, set()) - reported.keys())
        for name, version in check:
            v = t.files[name][version]
            has = reported.get((name, version)) == (v.size, v.checksum)
            moved = False
            for h in [h for h in v.holders if node_name(h) == me]:
                if h != node_id or not has:
                    moved |= t.remove_holder(name, v, h)
            if has:
                moved |= t.add_holder(name, v, node_id)
            if moved:  # a rejoin that changes nothing writes nothing (a big store is not re-journaled)
                changed.add(name)
            self._drop_if_unheld(name, v, me)

    def _take_reported(self, node_id: str, me: str, reported: Reported, changed: set[str]) -> Outbox:
        """Every reported copy: adopt it, or tell the node to drop it."""
        t = self.table
        out: Outbox = []
        pending = self.in_flight()
        files = t.files
        for (name, version), (size, checksum) in reported.items():
            versions = files.get(name)
            v = versions.get(version) if versions else None
            if v is None:
                self._unknown_copy(node_id, name, version, size, checksum, pending, changed, out)
            elif v.checksum == checksum and size == v.size:  # the common case, kept inline: 100k-item reports
                if node_id not in v.holders:
                    t.add_holder(name, v, node_id)
                    changed.add(name)
            else:
                out.append((node_id, Drop(name, version)))
                if t.remove_holder(name, v, node_id):
                    changed.add(name)
                    self._drop_if_unheld(name, v, me)
        return out

    def _unknown_copy(self, node_id: str, name: str, version: int, size: int, checksum: str,
                      pending: set[Key], changed: set[str], out: Outbox) -> None:
        """A reported copy of a version the metadata does not have."""
        t = self.table
        if self.tombstones.buries(name, version):
            log.info("%s v%d on %s was deleted while it was away: dropped", name, version, node_id)
            out.append((node_id, Drop(name, version)))
        elif name in t.next_version and version < t.next_version[name]:
            # Known name, version pruned (or its put failed) while the node was away.
            if (name, version) not in pending:
                out.append((node_id, Drop(name, version)))
        else:
            # Unknown to this master (rebuilding metadata from the nodes): adopt it.
            t.add_version(name, VersionMeta(version, size, checksum, time.time(), {node_id}))
            t.next_version[name] = max(t.next_version.get(name, 1), version + 1)
            changed.add(name)
            out += t.prune(name, self.cfg.max_versions, self.live_nodes())

    def _drop_if_unheld(self, name: str, v: VersionMeta, me: str) -> None:
        if not v.holders:
            log.warning("%s v%d: metadata listed a replica on %s, which does not have it, and no other "
                        "holder; entry dropped (no readable replica)", name, v.version, me)
            self.table.pop_version(name, v.version)
            self.stats["dropped_unreadable"] += 1

    def report_bad(self, node_id: str, name: str, version: int) -> Outbox:
        """A reader found a replica whose data fails its checksum."""
        v = self.table.files.get(name, {}).get(version)
        if v is None or node_id not in v.holders:
            return []
        live = self.live_nodes()
        if not any(h in live for h in v.holders if h != node_id):
            # Never destroy the last live copy on one reader's word: it may be the reader that is broken.
            log.warning("replica of %s v%d on %s reported bad, but it is the last live copy; kept", name, version,
                        node_id)
            return []
        log.warning("replica of %s v%d on %s reported bad; repairing", name, version, node_id)
        self.table.remove_holder(name, v, node_id)
        self.stats["bad_replicas"] += 1
        self.changed({name})
        # Drop first, then repair() may place a fresh copy on the same node (same channel, same order).
        return [(node_id, Drop(name, version))]
