"""Tombstones on their own: delete, confirmation by store reports, garbage collection, TTL."""

from __future__ import annotations

from collections import Counter

from common.protocol import Drop
from sdfs.table import FileTable, Tomb, VersionMeta
from sdfs.tombstones import Tombstones

TTL = 100.0


class Rig:
    def __init__(self) -> None:
        self.table = FileTable()
        self.now = [1000.0]
        self.changed: list[set[str]] = []
        self.stats = Counter[str]()
        self.tombs = Tombstones(self.table, TTL, lambda names: self.changed.append(set(names)), self.stats,
                                clock=lambda: self.now[0])

    def file(self, name: str, holders_by_version: dict[int, set[str]]) -> None:
        for version, holders in holders_by_version.items():
            self.table.add_version(name, VersionMeta(version, 1, "c", 0.0, set(holders)))
        self.table.next_version[name] = max(holders_by_version) + 1


def test_delete_drops_every_version_on_live_holders_and_waits_for_every_holder_name() -> None:
    r = Rig()
    r.file("f", {1: {"a@1", "b@1"}, 2: {"a@1", "down@3"}})
    count, out = r.tombs.delete("f", {"a@1": "x", "b@1": "y"})
    assert count == 2
    assert {(n, m.name, m.version) for n, m in out if isinstance(m, Drop)} == {("a@1", "f", 1), ("b@1", "f", 1),
                                                                              ("a@1", "f", 2)}
    assert len(out) == 3  # nothing for the holder that is down: its report will be answered
    assert r.table.tombs["f"] == Tomb(2, {"a", "b", "down"}, 1000.0)
    assert "f" not in r.table.files and r.table.tomb_pending == {"a": {"f"}, "b": {"f"}, "down": {"f"}}
    assert r.changed == [{"f"}] and r.stats["deletes"] == 1


def test_a_second_delete_keeps_the_first_tombstones_unconfirmed_nodes() -> None:
    r = Rig()
    r.file("f", {1: {"a@1"}})
    r.tombs.delete("f", {})
    r.file("f", {2: {"b@1"}})
    r.tombs.delete("f", {})
    assert r.table.tombs["f"].version == 2 and r.table.tombs["f"].pending == {"a", "b"}


def test_a_report_without_the_deleted_copy_confirms_and_the_last_confirmation_forgets_the_name() -> None:
    r = Rig()
    r.file("f", {1: {"a@1", "b@1"}})
    r.tombs.delete("f", {})
    assert r.tombs.confirm("a", {("f", 1): (1, "c")}) == set()  # still has it: not confirmed
    assert r.tombs.confirm("a", {("g", 1): (1, "c")}) == {"f"}
    assert r.table.tombs["f"].pending == {"b"}
    assert r.tombs.confirm("b", {("f", 2): (1, "c")}) == {"f"}  # a newer version is not the deleted one
    assert "f" not in r.table.tombs and "f" not in r.table.next_version  # nothing left to remember
    assert r.tombs.confirm("c", {}) == set()


def test_the_version_counter_survives_while_a_put_of_the_name_is_in_flight() -> None:
    r = Rig()
    r.file("f", {1: {"a@1"}})
    r.tombs.delete("f", {})
    r.table.reserve_version("f")  # a re-put racing the delete
    r.tombs.confirm("a", {})
    assert "f" not in r.table.tombs and r.table.next_version["f"] == 3


def test_tombstones_expire_oldest_first_after_the_ttl() -> None:
    r = Rig()
    for i, name in enumerate(["old", "mid", "new"]):
        r.now[0] = 1000.0 + 10 * i
        r.file(name, {1: {"gone@1"}})
        r.tombs.delete(name, {})
    r.changed.clear()
    r.now[0] = 1000.0 + TTL + 10
    r.tombs.expire()
    assert list(r.table.tombs) == ["new"] and r.changed == [{"old", "mid"}]
    assert r.table.tomb_pending == {"gone": {"new"}}


def test_buries_only_versions_up_to_the_deleted_one() -> None:
    r = Rig()
    r.file("f", {3: {"a@1"}})
    r.tombs.delete("f", {})
    assert r.tombs.buries("f", 1) and r.tombs.buries("f", 3)
    assert not r.tombs.buries("f", 4) and not r.tombs.buries("g", 1)
