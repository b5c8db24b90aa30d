"""The write path of the master on its own (PendingPuts) and the placement rule it shares with repair."""

from __future__ import annotations

from collections import Counter

import pytest

from common.config import Config
from common.protocol import Drop
from sdfs.errors import MasterError
from sdfs.placement import place
from sdfs.puts import PUT_TIMEOUT, PendingPuts
from sdfs.table import FileTable

NOW = 1000.0


class Rig:
    def __init__(self, n: int = 5, rf: int = 3, **cfg) -> None:
        self.live = {f"n{i}@1": f"10.0.0.{i}:9000" for i in range(n)}
        self.table = FileTable()
        self.changed: list[set[str]] = []
        self.stats = Counter[str]()
        self.puts = PendingPuts(self.table, Config(replication_factor=rf, **cfg), lambda: dict(self.live),
                                lambda names: self.changed.append(set(names)), self.stats)

    def begin(self, *names: str) -> list[dict]:
        return self.puts.begin([{"name": n, "size": 7, "checksum": "c"} for n in names], NOW)


def test_place_picks_the_least_loaded_live_nodes_outside_exclude() -> None:
    live = {n: "" for n in ["a", "b", "c", "d"]}
    load = Counter({"a": 5, "b": 0, "c": 1, "d": 0})
    for _ in range(20):
        assert set(place(2, live, load)) == {"b", "d"}
        assert place(2, live, load, exclude={"b"}) == ["d", "c"]
    assert sorted(place(9, live, load)) == ["a", "b", "c", "d"]


def test_a_bad_entry_refuses_the_whole_batch_before_any_version_is_handed_out() -> None:
    r = Rig()
    with pytest.raises(MasterError) as info:
        r.puts.begin([{"name": "ok", "size": 1, "checksum": "c"}, {"name": "../x", "size": 1, "checksum": "c"}], NOW)
    assert info.value.code == "bad_request"
    with pytest.raises(MasterError):
        r.puts.begin([{"name": "neg", "size": -1, "checksum": "c"}], NOW)
    assert r.table.next_version == {} and r.puts.pending == {} and r.changed == []


def test_begin_reserves_distinct_versions_persists_the_counter_and_counts_targets_as_load() -> None:
    r = Rig()
    a, b = r.begin("f", "f")
    assert (a["version"], b["version"]) == (1, 2) and a["quorum"] == r.puts.cfg.effective_write_quorum(3)
    assert r.changed == [{"f"}] and r.table.next_version["f"] == 3
    assert r.puts.keys() == {("f", 1), ("f", 2)}
    assert sum(r.puts.load().values()) == 6  # 2 puts x 3 targets, nothing stored yet
    assert r.table.stored_load == {}


def test_begin_with_no_live_node_is_unavailable() -> None:
    r = Rig()
    r.live.clear()
    with pytest.raises(MasterError) as info:
        r.begin("f")
    assert info.value.code == "unavailable"


def test_commit_records_the_version_on_its_alive_holders_and_a_retry_is_not_an_error() -> None:
    r = Rig()
    (p,) = r.begin("f")
    ids = [x["node_id"] for x in p["replicas"]]
    del r.live[ids[2]]  # stored there, but died before the commit: not a holder
    failed, out = r.puts.commit([{"put_id": p["put_id"], "stored": ids}], NOW)
    assert failed == {} and out == []
    assert r.table.files["f"][1].holders == set(ids[:2])
    assert r.stats["puts"] == 1 and r.stats["bytes_stored"] == 14
    assert r.puts.commit([{"put_id": p["put_id"], "stored": ids}], NOW) == ({}, [])
    assert r.puts.commit([{"put_id": "nope", "stored": []}], NOW)[0] == {"nope": "unknown or expired put"}


def test_commit_below_quorum_fails_and_drops_the_copies_written() -> None:
    r = Rig()
    (p,) = r.begin("f")
    first = p["replicas"][0]["node_id"]
    failed, out = r.puts.commit([{"put_id": p["put_id"], "stored": [first, "stranger@1"]}], NOW)
    assert "write quorum not reached" in failed["f"]
    assert out == [(first, Drop("f", 1))]  # a node that was never a target is not told anything
    assert "f" not in r.table.files and "f" not in r.table.pending_names


def test_commit_prunes_versions_beyond_max_versions() -> None:
    r = Rig(max_versions=2)
    for _ in range(3):
        (p,) = r.begin("f")
        _, out = r.puts.commit([{"put_id": p["put_id"], "stored": [x["node_id"] for x in p["replicas"]]}], NOW)
    assert sorted(r.table.files["f"]) == [2, 3]
    assert {m.version for _, m in out} == {1} and len(out) == 3


def test_replacement_targets_exclude_tried_nodes_and_count_is_capped() -> None:
    r = Rig(n=6)
    (p,) = r.begin("f")
    tried = [x["node_id"] for x in p["replicas"]]
    (plan,) = r.puts.replace_targets([{"put_id": p["put_id"], "exclude": tried, "count": 99}])
    new = [x["node_id"] for x in plan["replicas"]]
    assert len(new) == 3 and not set(new) & set(tried)
    assert r.puts.pending[p["put_id"]].replicas == tried + new
    with pytest.raises(MasterError) as info:
        r.puts.replace_targets([{"put_id": "gone"}])
    assert info.value.code == "not_found"
    with pytest.raises(MasterError) as info:
        r.puts.replace_targets(["not a map"])
    assert info.value.code == "bad_request"


def test_an_uncommitted_put_expires_and_releases_its_version() -> None:
    r = Rig()
    (p,) = r.begin("f")
    r.puts.expire(NOW + PUT_TIMEOUT)
    assert p["put_id"] in r.puts.pending
    r.puts.expire(NOW + PUT_TIMEOUT + 1)
    assert r.puts.pending == {} and "f" not in r.table.pending_names
    assert r.table.next_version["f"] == 2  # the version is never handed out again
