"""Node store reports and bad-replica reports on their own (NodeReports over a FileTable)."""

from __future__ import annotations

from collections import Counter

from common.config import Config
from common.protocol import Drop
from sdfs.reports import NodeReports, parse_store
from sdfs.table import FileTable, Key, VersionMeta
from sdfs.tombstones import Tombstones


class Rig:
    def __init__(self) -> None:
        self.live = {f"n{i}@1": f"10.0.0.{i}:9000" for i in range(4)}
        self.table = FileTable()
        self.in_flight: set[Key] = set()
        self.changed: list[set[str]] = []
        self.stats = Counter[str]()
        changed = lambda names: self.changed.append(set(names))  # noqa: E731
        tombs = Tombstones(self.table, 3600.0, changed, self.stats)
        self.tombs = tombs
        self.reports = NodeReports(self.table, tombs, Config(max_versions=2), lambda: dict(self.live),
                                   lambda: set(self.in_flight), changed, self.stats)

    def file(self, name: str, version: int, holders: set[str], checksum: str = "c") -> VersionMeta:
        v = VersionMeta(version, 1, checksum, 0.0, set(holders))
        self.table.add_version(name, v)
        self.table.next_version[name] = max(self.table.next_version.get(name, 1), version + 1)
        return v


def test_parse_store_skips_malformed_items_and_bad_names() -> None:
    store = [["ok", 1, 5, "c"], ["short", 1], ["../x", 1, 1, "c"], ["zero", 0, 1, "c"], ["n", "two", 1, "c"],
             None, ["known\x00", 2, 3, "d"]]
    assert parse_store(store, {"known\x00": 3}) == {("ok", 1): (5, "c"), ("known\x00", 2): (3, "d")}


def test_a_report_is_the_truth_missing_copies_stop_being_held_and_unheld_versions_go() -> None:
    r = Rig()
    r.file("kept", 1, {"n0@1", "n1@1"})
    r.file("lost", 1, {"n0@1", "n1@1"})
    r.file("only", 1, {"n0@1"})
    out = r.reports.node_report("n0@1", [["kept", 1, 1, "c"]])
    assert out == []
    assert r.table.files["lost"][1].holders == {"n1@1"}
    assert "only" not in r.table.files and r.stats["dropped_unreadable"] == 1
    assert r.changed == [{"lost", "only"}]


def test_a_new_incarnation_takes_over_its_old_incarnations_copies() -> None:
    r = Rig()
    r.file("f", 1, {"n0@1", "n1@1"})
    r.live["n0@2"] = "10.0.0.9:9000"
    assert r.reports.node_report("n0@2", [["f", 1, 1, "c"]]) == []
    assert r.table.files["f"][1].holders == {"n0@2", "n1@1"}
    assert r.table.held["n0"] == {("f", 1)} and "n0@1" not in r.table.stored_load


def test_reported_copies_are_adopted_dropped_or_kept_for_a_put_in_flight() -> None:
    r = Rig()
    r.file("match", 1, {"n1@1"})
    r.file("corrupt", 1, {"n0@1", "n1@1"})
    r.file("pruned", 3, {"n1@1"})
    r.table.next_version["inflight"] = 2
    r.in_flight.add(("inflight", 1))
    out = r.reports.node_report("n0@1", [["match", 1, 1, "c"], ["corrupt", 1, 1, "bad"], ["pruned", 1, 1, "c"],
                                         ["inflight", 1, 1, "c"], ["new", 4, 1, "c"]])
    assert {(n, m.name, m.version) for n, m in out if isinstance(m, Drop)} == {("n0@1", "corrupt", 1),
                                                                               ("n0@1", "pruned", 1)}
    assert len(out) == 2
    assert r.table.files["match"][1].holders == {"n0@1", "n1@1"}
    assert r.table.files["corrupt"][1].holders == {"n1@1"}
    assert r.table.files["new"][4].holders == {"n0@1"} and r.table.next_version["new"] == 5
    assert "inflight" not in r.table.files


def test_a_copy_deleted_while_the_node_was_away_is_dropped_and_the_tombstone_waits() -> None:
    r = Rig()
    r.file("f", 1, {"n0@1"})
    r.tombs.delete("f", {})
    out = r.reports.node_report("n0@1", [["f", 1, 1, "c"]])
    assert out == [("n0@1", Drop("f", 1))] and "f" not in r.table.files
    assert r.table.tombs["f"].pending == {"n0"}  # confirmed only by a report without the copy
    r.reports.node_report("n0@1", [])
    assert "f" not in r.table.tombs


def test_an_unchanged_report_writes_nothing() -> None:
    r = Rig()
    r.file("f", 1, {"n0@1"})
    assert r.reports.node_report("n0@1", [["f", 1, 1, "c"]]) == []
    assert r.changed == [set()]  # called with no name: MetaStore.changed writes nothing for it


def test_a_bad_replica_is_dropped_unless_it_is_the_last_live_copy() -> None:
    r = Rig()
    r.file("f", 1, {"n0@1", "n1@1"})
    assert r.reports.report_bad("n0@1", "f", 1) == [("n0@1", Drop("f", 1))]
    assert r.table.files["f"][1].holders == {"n1@1"} and r.stats["bad_replicas"] == 1
    assert r.reports.report_bad("n1@1", "f", 1) == []  # the last live copy is kept
    assert r.reports.report_bad("n3@1", "f", 1) == [] and r.reports.report_bad("n1@1", "g", 1) == []
