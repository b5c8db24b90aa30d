"""MetaStore on its own: SQLite rows and journal records of changed entries, snapshots, restore."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdfs import persist as persist_mod
from sdfs.persist import MetaStore
from sdfs.table import FileTable, Tomb, VersionMeta


def make(db: Path | None = None) -> tuple[MetaStore, list[tuple[str, dict[str, Any]]]]:
    journal: list[tuple[str, dict[str, Any]]] = []
    store = MetaStore(FileTable(), lambda op, data: journal.append((op, data)))
    if db is not None:
        store.open(str(db))
    return store, journal


def rows(store: MetaStore) -> set[str]:
    assert store.db is not None
    return {n for (n,) in store.db.execute("SELECT name FROM files")}


def test_a_change_is_persisted_and_journalled_as_whole_entries_and_reloaded(tmp_path: Path) -> None:
    store, journal = make(tmp_path / "m.db")
    store.table.add_version("f", VersionMeta(1, 3, "c", 0.0, {"a@1"}))
    store.table.next_version["f"] = 2
    store.changed({"f"})
    assert journal == [("sdfs.files", {"entries": {"f": store.table.entry("f")}})]
    store.db.close()
    again, _ = make(tmp_path / "m.db")
    assert again.table.entry("f") == store.table.entry("f") and again.table.held == {"a": {("f", 1)}}
    again.db.close()


def test_an_empty_entry_deletes_its_row_and_no_change_writes_nothing(tmp_path: Path) -> None:
    store, journal = make(tmp_path / "m.db")
    store.table.set_tomb("f", Tomb(1, {"a"}, 0.0))
    store.changed({"f"})
    assert rows(store) == {"f"}
    store.table.set_tomb("f", None)
    store.changed({"f"})
    assert rows(store) == set()
    journal.clear()
    store.changed(set())
    assert journal == []
    store.db.close()


def test_a_big_change_set_is_journalled_in_batches(monkeypatch) -> None:
    monkeypatch.setattr(persist_mod, "JOURNAL_BATCH", 3)
    store, journal = make()
    for i in range(7):
        store.table.next_version[f"f{i}"] = 2
    store.changed([f"f{i}" for i in range(7)])
    assert [len(d["entries"]) for _, d in journal] == [3, 3, 1]


def test_restore_replaces_the_namespace_and_its_rows(tmp_path: Path) -> None:
    src, _ = make()
    src.table.add_version("new", VersionMeta(1, 1, "c", 0.0, {"b@1"}))
    src.table.next_version["new"] = 2
    store, _ = make(tmp_path / "m.db")
    store.table.add_version("old", VersionMeta(1, 1, "c", 0.0, {"a@1"}))
    store.table.next_version["old"] = 2
    store.changed({"old"})
    store.restore(src.snapshot())
    assert store.table.names() == {"new"} and rows(store) == {"new"}
    assert store.table.held == {"b": {("new", 1)}}
    store.db.close()


def test_applied_entries_reach_the_table_and_the_disk_without_journalling(tmp_path: Path) -> None:
    src, _ = make()
    src.table.add_version("f", VersionMeta(2, 1, "c", 0.0, {"a@1"}))
    src.table.next_version["f"] = 3
    store, journal = make(tmp_path / "m.db")
    store.apply_entries(src.snapshot()["entries"])
    assert store.table.entry("f") == src.table.entry("f") and rows(store) == {"f"}
    assert journal == []  # a standby applies what the primary journalled: it does not journal it again
    store.db.close()
