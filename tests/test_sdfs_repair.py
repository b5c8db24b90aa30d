"""The repair planner on its own: a FileTable, a live-node dict, no master, no network."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from common.config import Config
from common.protocol import Drop, Replicate
from sdfs import repair as repair_mod
from sdfs.repair import REPAIR_TIMEOUT, RepairPlanner
from sdfs.table import FileTable, VersionMeta

NOW = 1000.0


class Rig:
    """A planner over a table; ``live`` is what live_nodes() returns, ``changed`` what was persisted."""

    def __init__(self, n: int = 6, rf: int = 3) -> None:
        self.cfg = Config(replication_factor=rf)
        self.live = {f"n{i}@1": f"10.0.0.{i}:9000" for i in range(n)}
        self.table = FileTable()
        self.changed: list[set[str]] = []
        self.stats = Counter[str]()
        self.planner = RepairPlanner(self.table, self.cfg, lambda: dict(self.live),
                                     lambda: Counter(self.table.stored_load),
                                     lambda names: self.changed.append(set(names)), self.stats)

    def add(self, name: str, holders: set[str], version: int = 1, size: int = 10) -> VersionMeta:
        v = VersionMeta(version, size, "c", 0.0, set(holders))
        self.table.add_version(name, v)
        return v


def copies(out: list[tuple[str, Any]]) -> dict[tuple[str, int], set[str]]:
    got: dict[tuple[str, int], set[str]] = {}
    for target, m in out:
        assert isinstance(m, Replicate)
        got.setdefault((m.name, m.version), set()).add(target)
    return got


def test_a_short_version_is_copied_to_the_least_loaded_nodes_from_its_live_holders() -> None:
    r = Rig()
    r.add("busy", {"n2@1", "n3@1", "n4@1"})  # n2..n4 carry load: the copies must go to n1 and n5
    r.add("f", {"n0@1"})
    out = r.planner.tick(NOW)
    assert copies(out) == {("f", 1): {"n1@1", "n5@1"}}
    assert all(m.sources == ["10.0.0.0:9000"] and m.size == 10 for _, m in out)
    assert r.table.dirty == {("f", 1): None}  # copies under way: checked again when they report
    assert set(r.planner.repairs) == {("f", 1, "n1@1"), ("f", 1, "n5@1")}
    assert r.planner.tick(NOW) == []  # in flight: not planned twice


def test_a_stored_copy_becomes_a_holder_and_the_version_leaves_the_dirty_set() -> None:
    r = Rig()
    r.add("f", {"n0@1", "n1@1"})
    ((target, m),) = r.planner.tick(NOW)
    assert r.planner.stored(target, "f", 1, True, "c") == []
    assert r.table.files["f"][1].holders == {"n0@1", "n1@1", target}
    assert r.changed[-1] == {"f"} and r.stats["re_replications"] == 1 and r.stats["bytes_replicated"] == 10
    assert r.planner.tick(NOW) == [] and r.table.dirty == {}


def test_a_copy_with_the_wrong_checksum_is_dropped_and_the_version_checked_again() -> None:
    r = Rig(n=3)
    r.add("f", {"n0@1", "n1@1"})
    ((target, _),) = r.planner.tick(NOW)
    assert r.planner.stored(target, "f", 1, True, "other") == [(target, Drop("f", 1))]
    assert target not in r.table.files["f"][1].holders
    assert copies(r.planner.tick(NOW)) == {("f", 1): {target}}  # asked again (the only non-holder)


def test_a_timed_out_copy_is_planned_again_and_a_dead_targets_copy_elsewhere() -> None:
    r = Rig(n=5)
    r.add("f", {"n0@1", "n1@1"})
    ((target, _),) = r.planner.tick(NOW)
    assert r.planner.tick(NOW + REPAIR_TIMEOUT - 1) == []
    again = r.planner.tick(NOW + REPAIR_TIMEOUT)
    assert len(again) == 1  # the timed-out copy was forgotten and planned again
    ((t2, _),) = again
    del r.live[t2]
    r.planner.node_down(t2)
    ((t3, _),) = r.planner.tick(NOW + REPAIR_TIMEOUT + 1)
    assert t3 != t2 and t3 in r.live


def test_in_flight_copies_are_capped_per_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repair_mod, "MAX_REPAIRS_IN_FLIGHT", 5)
    r = Rig()
    for i in range(10):
        r.add(f"f{i}", {"n0@1"})  # each needs 2 copies
    first = r.planner.tick(NOW)
    assert len(first) == 6  # the budget is checked per version: 3 versions fit under 5 (2 + 2 + 2)
    assert r.planner.tick(NOW) == []  # the budget is spent until copies finish
    for target, m in first:
        r.planner.stored(target, m.name, m.version, True, "c")
    assert len(r.planner.tick(NOW)) == 6


def test_versions_checked_per_tick_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repair_mod, "MAX_CHECKS_PER_TICK", 4)
    r = Rig()
    for i in range(10):
        r.add(f"f{i}", {"n0@1", "n1@1", "n2@1"})  # fully replicated: each check settles it
    r.planner.tick(NOW)
    assert len(r.table.dirty) == 6
    r.planner.tick(NOW)
    r.planner.tick(NOW)
    assert r.table.dirty == {}


def test_node_down_marks_only_that_nodes_versions() -> None:
    r = Rig()
    r.add("a", {"n0@1", "n1@1", "n2@1"})
    r.add("b", {"n3@1", "n4@1", "n5@1"})
    r.planner.tick(NOW)
    assert r.table.dirty == {}
    del r.live["n4@1"]
    r.planner.node_down("n4@1")
    assert list(r.table.dirty) == [("b", 1)]
    ((target, m),) = r.planner.tick(NOW)
    assert (m.name, target in {"n0@1", "n1@1", "n2@1"}) == ("b", True)  # a live non-holder
    assert sorted(m.sources) == ["10.0.0.3:9000", "10.0.0.5:9000"]


def test_copies_on_dead_nodes_are_forgotten_once_fully_replicated_on_live_ones() -> None:
    r = Rig(rf=2)
    r.add("f", {"n0@1", "n1@1", "n2@1"})
    del r.live["n2@1"]
    r.planner.node_down("n2@1")
    assert r.planner.tick(NOW) == []
    assert r.table.files["f"][1].holders == {"n0@1", "n1@1"}
    assert r.changed == [{"f"}] and "n2" not in r.table.held


def test_a_version_with_no_live_holder_waits_for_one() -> None:
    r = Rig()
    r.add("f", {"gone@1"})
    assert r.planner.tick(NOW) == [] and r.table.dirty == {}  # nothing to copy from: left alone


def test_more_live_nodes_than_before_mark_every_version() -> None:
    r = Rig(n=2, rf=3)
    r.add("f", {"n0@1", "n1@1"})
    assert r.planner.tick(NOW) == [] and r.table.dirty == {}  # target min(3, 2) = 2 is met
    r.live["n9@1"] = "10.0.0.9:9000"
    assert copies(r.planner.tick(NOW)) == {("f", 1): {"n9@1"}}


def test_loaded_metadata_settles_for_a_failure_timeout_before_copying() -> None:
    r = Rig()
    r.add("f", {"n0@1"})
    r.planner.loaded = True
    assert r.planner.tick(NOW) == []
    assert r.planner.tick(NOW + r.cfg.failure_timeout - 0.1) == []
    out = r.planner.tick(NOW + r.cfg.failure_timeout)
    assert list(copies(out)) == [("f", 1)] and len(out) == 2


def test_under_replicated_counts_versions_below_the_target() -> None:
    r = Rig()
    r.add("a", {"n0@1", "n1@1", "n2@1"})
    r.add("b", {"n0@1"})
    r.add("c", {"gone@1"})
    assert r.planner.under_replicated() == 2
