"""Durability and replication of the SDFS namespace: one SQLite row and one journal record per name.

Separate from the in-memory table (sdfs/table.py) because it is a different concern with its own
failure modes: what survives a restart of the coordinator (SQLite, WAL) and what the standby sees
(the journal). Both carry the same idempotent record, the whole entry of a changed name, so
applying one twice or out of a batch boundary is harmless.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

from sdfs.table import FileTable, is_empty

log = logging.getLogger("idunno.sdfs.master")

JOURNAL_BATCH = 2000  # entries per journalled op (an entry is ~0.3-1 KB: far below one frame)

Journal = Callable[[str, dict[str, Any]], None]


class MetaStore:
    """Persists and journals entries of a FileTable; loads, applies and restores them."""

    def __init__(self, table: FileTable, journal: Journal | None = None) -> None:
        self.table = table
        self.journal = journal or (lambda op, data: None)
        self.db: sqlite3.Connection | None = None

    def open(self, path: str) -> None:
        """Open (or create) the database and load every entry it holds into the table."""
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, entry TEXT NOT NULL)")
        for name, entry in self.db.execute("SELECT name, entry FROM files"):
            self.table.load_entry(name, json.loads(entry))
        log.info("loaded metadata of %d files (%d tombstones) from %s", len(self.table.files),
                 len(self.table.tombs), path)

    def changed(self, names: Iterable[str]) -> None:
        """Persist and journal the whole entry of every changed file (idempotent records)."""
        entries = {n: self.table.entry(n) for n in names}
        if not entries:
            return
        self.persist(entries)
        # Several ops for a big change set (a restarted node re-homing 100k replicas): each journal
        # op must fit in one frame on its way to the standby.
        names = list(entries)
        for i in range(0, len(names), JOURNAL_BATCH):
            self.journal("sdfs.files", {"entries": {n: entries[n] for n in names[i:i + JOURNAL_BATCH]}})

    def persist(self, entries: dict[str, dict[str, Any]]) -> None:
        if self.db is None:
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR REPLACE INTO files (name, entry) VALUES (?, ?)",
                [(n, json.dumps(e)) for n, e in entries.items() if not is_empty(e)],
            )
            gone = [(n,) for n, e in entries.items() if is_empty(e)]
            self.db.executemany("DELETE FROM files WHERE name = ?", gone)

    # replication from the primary (standby side) and snapshots
    def apply_entries(self, entries: dict[str, dict[str, Any]]) -> None:
        for name, e in entries.items():
            self.table.load_entry(name, e)
        self.persist(entries)

    def snapshot(self) -> dict[str, Any]:
        return {"entries": {n: self.table.entry(n) for n in self.table.names()}}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Replace the whole namespace with a snapshot's (a standby's full sync)."""
        self.table.clear()
        entries = snapshot["entries"]
        for name, e in entries.items():
            self.table.load_entry(name, e)
        if self.db is not None:
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("DELETE FROM files")
        self.persist(entries)
