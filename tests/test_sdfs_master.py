"""SDFS metadata master: versions, placement, quorum commits, pruning, repair, node reports, persistence."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.config import Config
from common.protocol import Drop, Message, Replicate
from sdfs.master import PUT_TIMEOUT, REPAIR_TIMEOUT, MasterError, SdfsMaster

RF = 4
NOW = 1000.0


def addr(node: str) -> str:
    return f"10.0.0.{node[1:].split('@')[0]}:9000"


def nodes(n: int) -> dict[str, str]:
    return {f"n{i}@1": addr(f"n{i}@1") for i in range(n)}


class Cluster:
    """A master plus the live-node dict it reads (mutate ``live`` to kill/revive nodes)."""

    def __init__(self, n: int = 6, db_path: Path | None = None, **cfg: Any) -> None:
        self.live = nodes(n)
        self.cfg = Config(replication_factor=RF, **cfg)
        self.journal: list[tuple[str, dict[str, Any]]] = []
        self.master = self.open(db_path)

    def open(self, db_path: Path | None) -> SdfsMaster:
        return SdfsMaster(
            self.cfg,
            lambda: dict(self.live),
            str(db_path) if db_path else None,
            journal=lambda op, data: self.journal.append((op, data)),
        )

    def begin(self, name: str, size: int = 10, checksum: str = "c0ffee") -> dict[str, Any]:
        (plan,) = self.master.begin_put([{"name": name, "size": size, "checksum": checksum}], NOW)
        return plan

    def commit(self, plan: dict[str, Any], stored: list[str] | None = None) -> tuple[dict[str, str], list]:
        if stored is None:
            stored = [r["node_id"] for r in plan["replicas"]]
        return self.master.commit_put([{"put_id": plan["put_id"], "stored": stored}], NOW)

    def put(self, name: str, size: int = 10, checksum: str = "c0ffee") -> dict[str, Any]:
        plan = self.begin(name, size, checksum)
        failed, _ = self.commit(plan)
        assert failed == {}
        return plan

    def kill(self, node: str) -> None:
        del self.live[node]
        self.master.node_down(node)

    def holders(self, name: str, version: int) -> set[str]:
        """The live holders (the metadata also keeps holders that are down: they may come back)."""
        return {h for h in self.master.files[name][version].holders if h in self.live}


def replica_ids(plan: dict[str, Any]) -> list[str]:
    return [r["node_id"] for r in plan["replicas"]]


def drops(out: list[tuple[str, Message]]) -> set[tuple[str, str, int]]:
    assert all(isinstance(m, Drop) for _, m in out), out
    return {(n, m.name, m.version) for n, m in out}


@pytest.fixture
def c() -> Iterator[Cluster]:
    cl = Cluster()
    yield cl
    if cl.master.db is not None:
        cl.master.db.close()


# --------------------------------------------------------------------------------------------
# puts


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_begin_put_places_min_rf_live_distinct_replicas(n: int) -> None:
    cl = Cluster(n)
    plan = cl.begin("data/img_001.jpg", 123, "abc")
    ids = replica_ids(plan)
    assert len(ids) == min(RF, n)
    assert len(set(ids)) == len(ids)
    assert all(cl.live[r["node_id"]] == r["addr"] for r in plan["replicas"])
    assert plan["version"] == 1 and plan["name"] == "data/img_001.jpg"
    assert plan["quorum"] == min(RF, n) // 2 + 1  # W defaults to a majority of N
    assert plan["put_id"] in cl.master.pending


def test_begin_put_without_live_nodes_is_unavailable() -> None:
    cl = Cluster(0)
    with pytest.raises(MasterError) as info:
        cl.begin("f")
    assert info.value.code == "unavailable"


def test_placement_spreads_load(c: Cluster) -> None:
    c.live = nodes(8)
    a = set(replica_ids(c.begin("a")))  # pending puts count as load
    b = set(replica_ids(c.begin("b")))
    assert a.isdisjoint(b) and a | b == set(c.live)


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "../x", "size": 1, "checksum": "c"},
        {"name": "", "size": 1, "checksum": "c"},
        {"name": 5, "size": 1, "checksum": "c"},
        {"size": 1, "checksum": "c"},
        {"name": "f", "checksum": "c"},
        {"name": "f", "size": "big", "checksum": "c"},
        {"name": "f", "size": -1, "checksum": "c"},
        {"name": "f", "size": 1},
    ],
)
def test_begin_put_bad_entry_is_bad_request(c: Cluster, entry: dict[str, Any]) -> None:
    with pytest.raises(MasterError) as info:
        c.master.begin_put([entry], NOW)
    assert info.value.code == "bad_request"


def test_versions_are_monotonic_even_when_puts_interleave(c: Cluster) -> None:
    p1 = c.begin("f", checksum="one")
    p2 = c.begin("f", checksum="two")
    assert (p1["version"], p2["version"]) == (1, 2)
    assert p1["put_id"] != p2["put_id"]
    assert c.commit(p2)[0] == {}  # the later put commits first
    assert c.commit(p1)[0] == {}
    p3 = c.begin("f", checksum="three")
    assert p3["version"] == 3
    batch = c.master.begin_put([{"name": "f", "size": 1, "checksum": "x"}] * 2, NOW)
    assert [p["version"] for p in batch] == [4, 5]
    located = c.master.locate("f", 10)
    assert [(v["version"], v["checksum"]) for v in located] == [(2, "two"), (1, "one")]
    assert c.master.begin_put([{"name": "other", "size": 1, "checksum": "x"}], NOW)[0]["version"] == 1


def test_commit_with_quorum_makes_version_visible(c: Cluster) -> None:
    plan = c.begin("data/a.jpg", 42, "sum")
    with pytest.raises(MasterError) as info:
        c.master.locate("data/a.jpg", 1)
    assert info.value.code == "not_found"  # not visible before the commit
    failed, out = c.commit(plan)
    assert failed == {} and out == []
    assert plan["put_id"] not in c.master.pending
    (v,) = c.master.locate("data/a.jpg", 1)
    assert (v["version"], v["size"], v["checksum"]) == (1, 42, "sum")
    assert {r["node_id"] for r in v["replicas"]} == set(replica_ids(plan))
    assert all(r["addr"] == c.live[r["node_id"]] for r in v["replicas"])
    assert c.master.under_replicated() == 0
    listing = c.master.ls("data/")
    assert [e["name"] for e in listing] == ["data/a.jpg"]


def test_commit_below_quorum_fails_and_drops_stored_replicas(c: Cluster) -> None:
    plan = c.begin("f")
    ids = replica_ids(plan)
    failed, out = c.commit(plan, stored=ids[:2])  # W = majority of N = 3
    assert "quorum not reached (2/3 replicas; 6 storage nodes alive)" in failed["f"]
    assert drops(out) == {(n, "f", 1) for n in ids[:2]}
    with pytest.raises(MasterError) as info:
        c.master.locate("f", 1)
    assert info.value.code == "not_found"
    assert c.begin("f")["version"] == 2  # a failed version number is never reused


def test_commit_ignores_dead_and_unplanned_nodes(c: Cluster) -> None:
    plan = c.begin("f")
    ids = replica_ids(plan)
    outsider = next(n for n in c.live if n not in ids)
    del c.live[ids[0]]  # died after storing, before the commit
    del c.live[ids[1]]
    failed, out = c.commit(plan, stored=[ids[0], ids[1], ids[2], outsider])
    assert "quorum" in failed["f"]
    assert outsider not in {n for n, _ in out}  # never asked to store: nothing to drop
    assert {n for n, _ in out} == set(ids[:3])


def test_replacement_target_counts_toward_the_quorum(c: Cluster) -> None:
    """Pipeline recovery: a failed target is replaced by another live node, which the commit accepts."""
    plan = c.begin("f")
    ids = replica_ids(plan)
    del c.live[ids[0]]  # one chosen target died, another was slow
    (repl,) = c.master.replace_targets([{"put_id": plan["put_id"], "exclude": ids[:2], "count": 2}])
    new = [r["node_id"] for r in repl["replicas"]]
    assert len(new) == 2 and not set(new) & set(ids) and all(n in c.live for n in new)
    assert (repl["name"], repl["version"], repl["quorum"]) == ("f", 1, 3)
    failed, _ = c.commit(plan, stored=[ids[2], *new])
    assert failed == {}
    assert c.holders("f", 1) == {ids[2], *new}
    # No node left to offer: an empty list, not an error; an unknown put is an error.
    (none,) = c.master.replace_targets([{"put_id": c.begin("g")["put_id"], "exclude": list(c.live), "count": 1}])
    assert none["replicas"] == []
    with pytest.raises(MasterError):
        c.master.replace_targets([{"put_id": "nope"}])
    with pytest.raises(MasterError):
        c.master.replace_targets(["not a map"])  # type: ignore[list-item]


def test_write_quorum_below_n_commits_and_is_repaired() -> None:
    cl = Cluster(6, write_quorum=3)
    plan = cl.begin("f")
    assert plan["quorum"] == 3
    ids = replica_ids(plan)
    failed, _ = cl.commit(plan, stored=ids[:3])
    assert failed == {}
    assert cl.holders("f", 1) == set(ids[:3])
    assert cl.master.under_replicated() == 1
    (cmd,) = cl.master.repair(NOW)
    assert cmd[0] not in ids[:3]


def test_repeated_commit_is_idempotent_and_unknown_put_fails(c: Cluster) -> None:
    plan = c.put("f")
    # A client retrying a commit whose reply was lost must not be told its committed put failed.
    failed, out = c.master.commit_put([{"put_id": plan["put_id"], "stored": replica_ids(plan)}], NOW)
    assert failed == {} and out == []
    assert [v["version"] for v in c.master.locate("f", 5)] == [1]
    failed, _ = c.master.commit_put([{"put_id": "nope", "stored": []}, {"stored": []}], NOW)
    assert set(failed) == {"nope", "None"}


def test_expired_pending_put_cannot_commit(c: Cluster) -> None:
    plan = c.begin("f")
    c.master.repair(NOW + PUT_TIMEOUT + 1)
    assert plan["put_id"] not in c.master.pending
    failed, _ = c.commit(plan)
    assert "expired" in failed[plan["put_id"]]


def test_locate_errors(c: Cluster) -> None:
    with pytest.raises(MasterError) as info:
        c.master.locate("missing", 1)
    assert info.value.code == "not_found"
    for bad in ("../x", "/abs", "a//b", ""):
        with pytest.raises(MasterError) as info:
            c.master.locate(bad, 1)
        assert info.value.code == "bad_request"


def test_locate_count(c: Cluster) -> None:
    for _ in range(3):
        c.put("f")
    assert [v["version"] for v in c.master.locate("f", 1)] == [3]
    assert [v["version"] for v in c.master.locate("f", 0)] == [3]
    assert [v["version"] for v in c.master.locate("f", 2)] == [3, 2]
    assert [v["version"] for v in c.master.locate("f", 99)] == [3, 2, 1]


def test_locate_lists_only_live_replicas(c: Cluster) -> None:
    plan = c.put("f")
    dead = replica_ids(plan)[0]
    del c.live[dead]
    (v,) = c.master.locate("f", 1)
    assert dead not in {r["node_id"] for r in v["replicas"]}
    assert len(v["replicas"]) == RF - 1


# --------------------------------------------------------------------------------------------
# pruning and delete


def test_prune_keeps_max_versions_newest() -> None:
    cl = Cluster(6, max_versions=2)
    p1 = cl.put("f")
    p2 = cl.put("f")
    p3 = cl.begin("f")
    failed, out = cl.commit(p3)
    assert failed == {}
    assert drops(out) == {(n, "f", 1) for n in replica_ids(p1)}
    assert sorted(cl.master.files["f"]) == [2, 3]
    assert [v["version"] for v in cl.master.locate("f", 10)] == [3, 2]
    _, out = cl.commit(cl.begin("f"))
    assert drops(out) == {(n, "f", 2) for n in replica_ids(p2)}
    assert cl.begin("f")["version"] == 5


def test_delete_drops_every_holder_and_hides_the_file(c: Cluster) -> None:
    c.live = nodes(8)
    p1 = c.put("f")
    p2 = c.put("f")
    c.put("g")
    count, out = c.master.delete("f")
    assert count == 2
    # Exact versions (never "every version": a re-put racing the delete keeps its copy).
    assert drops(out) == {(n, "f", 1) for n in replica_ids(p1)} | {(n, "f", 2) for n in replica_ids(p2)}
    assert len(out) == len(replica_ids(p1)) + len(replica_ids(p2))  # one Drop per copy
    assert [e["name"] for e in c.master.ls("")] == ["g"]
    with pytest.raises(MasterError) as info:
        c.master.locate("f", 1)
    assert info.value.code == "not_found"
    with pytest.raises(MasterError) as info:
        c.master.delete("f")
    assert info.value.code == "not_found"
    with pytest.raises(MasterError) as info:
        c.master.delete("../f")
    assert info.value.code == "bad_request"
    assert c.begin("f")["version"] == 3  # a re-created file does not reuse deleted versions


def test_ls_glob_and_prefix(c: Cluster) -> None:
    for name in ("data/a.jpg", "data/b.png", "database", "other"):
        c.put(name)
    names = lambda p: [e["name"] for e in c.master.ls(p)]  # noqa: E731
    assert names("data/") == ["data/a.jpg", "data/b.png"]
    assert names("data") == ["data/a.jpg", "data/b.png", "database"]
    assert names("*.jpg") == ["data/a.jpg"]
    assert names("") == ["data/a.jpg", "data/b.png", "database", "other"]
    assert names("nothing*") == []


# --------------------------------------------------------------------------------------------
# repair


def test_node_down_then_repair_restores_replication(c: Cluster) -> None:
    plan = c.put("f", 77, "sum")
    ids = replica_ids(plan)
    c.kill(ids[0])
    survivors = set(ids[1:])
    assert c.holders("f", 1) == survivors
    assert c.master.under_replicated() == 1

    out = c.master.repair(NOW)
    assert len(out) == 1
    target, cmd = out[0]
    assert isinstance(cmd, Replicate)
    assert target in c.live and target not in ids
    assert (cmd.name, cmd.version, cmd.size, cmd.checksum) == ("f", 1, 77, "sum")
    assert sorted(cmd.sources) == sorted(c.live[s] for s in survivors)

    assert c.master.repair(NOW + 1) == []  # already in progress: not re-issued
    assert c.master.stored(target, "f", 1, True, "sum") == []
    assert c.holders("f", 1) == survivors | {target}
    assert c.master.under_replicated() == 0
    assert c.master.repair(NOW + 2) == []


def test_repair_of_two_lost_holders_uses_distinct_targets() -> None:
    cl = Cluster(8)
    plan = cl.put("f")
    ids = replica_ids(plan)
    cl.kill(ids[0])
    cl.kill(ids[1])
    out = cl.master.repair(NOW)
    targets = [t for t, _ in out]
    assert len(targets) == 2 and len(set(targets)) == 2
    assert not set(targets) & set(ids)
    assert all(isinstance(m, Replicate) and sorted(m.sources) == sorted(cl.live[h] for h in ids[2:]) for _, m in out)
    for t in targets:
        cl.master.stored(t, "f", 1, True, "c0ffee")
    assert cl.master.under_replicated() == 0
    assert len(cl.holders("f", 1)) == RF


def test_repair_is_reissued_after_timeout_failure_or_target_death(c: Cluster) -> None:
    plan = c.put("f")
    c.kill(replica_ids(plan)[0])
    ((t1, _),) = c.master.repair(NOW)
    ((t2, _),) = c.master.repair(NOW + REPAIR_TIMEOUT + 1)  # timed out: tried again
    c.master.stored(t2, "f", 1, False, "")  # the copy failed
    ((t3, _),) = c.master.repair(NOW + REPAIR_TIMEOUT + 2)
    del c.live[t3]  # the repair target died
    c.master.node_down(t3)
    out = c.master.repair(NOW + REPAIR_TIMEOUT + 3)
    assert len(out) == 1 and out[0][0] != t3
    assert {t1, t2} <= set(nodes(6))


def test_repair_with_no_surviving_holder_does_nothing(c: Cluster) -> None:
    plan = c.put("f")
    for n in replica_ids(plan):
        c.kill(n)
    assert c.master.repair(NOW) == []
    assert c.master.under_replicated() == 1


def test_repair_target_shrinks_with_live_nodes() -> None:
    cl = Cluster(4)
    plan = cl.put("f")
    cl.kill(replica_ids(plan)[0])
    assert cl.master.repair(NOW) == []  # 3 live nodes, all hold it: nothing to do
    assert cl.master.under_replicated() == 0


def test_stored_with_wrong_checksum_or_unknown_version_is_dropped(c: Cluster) -> None:
    plan = c.put("f")
    c.kill(replica_ids(plan)[0])
    ((t, _),) = c.master.repair(NOW)
    assert drops(c.master.stored(t, "f", 1, True, "bogus")) == {(t, "f", 1)}
    assert t not in c.holders("f", 1)
    assert drops(c.master.stored(t, "f", 9, True, "c0ffee")) == {(t, "f", 9)}
    assert drops(c.master.stored(t, "nope", 1, True, "c0ffee")) == {(t, "nope", 1)}


def test_report_bad_drops_holder_and_repair_replaces_it() -> None:
    cl = Cluster(4)  # every node holds the file: the repair must go back to the reported node
    plan = cl.put("f")
    bad = replica_ids(plan)[0]
    assert drops(cl.master.report_bad(bad, "f", 1)) == {(bad, "f", 1)}
    assert bad not in cl.holders("f", 1)
    assert cl.master.report_bad(bad, "f", 1) == []  # no longer a holder
    assert cl.master.report_bad(bad, "nope", 1) == []
    assert cl.master.under_replicated() == 1
    ((target, cmd),) = cl.master.repair(NOW)
    assert target == bad
    assert isinstance(cmd, Replicate)
    assert cl.live[bad] not in cmd.sources and len(cmd.sources) == RF - 1
    cl.master.stored(bad, "f", 1, True, "c0ffee")
    assert cl.master.under_replicated() == 0


# --------------------------------------------------------------------------------------------
# node reports (rejoin with a store listing)


def test_node_report_adopts_matching_replica(c: Cluster) -> None:
    plan = c.put("f", 10, "sum")
    node = replica_ids(plan)[0]
    c.kill(node)
    c.live[node] = addr(node)  # back (same id for the test)
    assert c.master.node_report(node, [["f", 1, 10, "sum"]]) == []
    assert node in c.holders("f", 1)
    assert c.master.under_replicated() == 0


def test_node_report_drops_wrong_checksum_or_size(c: Cluster) -> None:
    plan = c.put("f", 10, "sum")
    node = next(n for n in c.live if n not in replica_ids(plan))
    out = c.master.node_report(node, [["f", 1, 10, "other"]])
    assert drops(out) == {(node, "f", 1)}
    out = c.master.node_report(node, [["f", 1, 11, "sum"]])
    assert drops(out) == {(node, "f", 1)}
    assert node not in c.holders("f", 1)


def test_node_report_drops_deleted_and_pruned_versions() -> None:
    cl = Cluster(6, max_versions=1)
    cl.put("g")
    cl.put("g")  # v1 pruned
    cl.put("f")
    cl.master.delete("f")
    out = cl.master.node_report("n5@1", [["f", 1, 10, "c0ffee"], ["g", 1, 10, "c0ffee"]])
    assert drops(out) == {("n5@1", "f", 1), ("n5@1", "g", 1)}
    assert "f" not in cl.master.files
    assert sorted(cl.master.files["g"]) == [2]


def test_node_report_keeps_version_of_a_pending_put(c: Cluster) -> None:
    c.put("f")
    plan = c.begin("f")  # v2 being written right now
    node = replica_ids(plan)[0]
    assert c.master.node_report(node, [["f", 2, 10, "c0ffee"]]) == []
    assert 2 not in c.master.files["f"]  # not committed by a report either


def test_node_report_adopts_unknown_names(c: Cluster) -> None:
    out = c.master.node_report("n1@1", [["lost/found.txt", 3, 5, "abc"], ["lost/found.txt", 4, 6, "def"]])
    assert out == []
    assert [(v["version"], v["size"], v["checksum"]) for v in c.master.locate("lost/found.txt", 9)] == [
        (4, 6, "def"),
        (3, 5, "abc"),
    ]
    assert c.holders("lost/found.txt", 3) == {"n1@1"}
    assert c.begin("lost/found.txt")["version"] == 5
    # a second node reporting the same replica becomes another holder
    c.master.node_report("n2@1", [["lost/found.txt", 3, 5, "abc"]])
    assert c.holders("lost/found.txt", 3) == {"n1@1", "n2@1"}


def test_node_report_ignores_malformed_items(c: Cluster) -> None:
    out = c.master.node_report("n1@1", [[], ["x"], ["../evil", 1, 1, "c"], ["f", "v", 1, "c"], [None, 1, 1, "c"]])
    assert out == []
    assert "../evil" not in c.master.files and "f" not in c.master.files


# --------------------------------------------------------------------------------------------
# persistence and replication


def test_restart_sees_same_files_and_never_reuses_a_version(tmp_path: Path) -> None:
    db = tmp_path / "meta.sqlite"
    cl = Cluster(6, db_path=db)
    cl.put("a", 1, "a1")
    cl.put("a", 2, "a2")
    cl.put("data/b", 3, "b1")
    cl.begin("a")  # v3 handed out but never committed
    cl.begin("uncommitted")  # only a version counter exists
    cl.put("gone")
    cl.master.delete("gone")
    before = {e["name"]: [(v["version"], v["checksum"]) for v in e["versions"]] for e in cl.master.ls("")}
    holders = cl.holders("a", 2)
    cl.master.db.close()

    second = cl.open(db)
    try:
        after = {e["name"]: [(v["version"], v["checksum"]) for v in e["versions"]] for e in second.ls("")}
        assert after == before == {"a": [(2, "a2"), (1, "a1")], "data/b": [(1, "b1")]}
        assert second.files["a"][2].holders == holders
        assert second.next_version == {"a": 4, "data/b": 2, "uncommitted": 2, "gone": 2}
        versions = second.begin_put(
            [{"name": n, "size": 1, "checksum": "x"} for n in ("a", "uncommitted", "gone", "new")], NOW
        )
        assert [p["version"] for p in versions] == [4, 2, 2, 1]
    finally:
        second.db.close()


def test_repair_state_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "meta.sqlite"
    cl = Cluster(6, db_path=db)
    plan = cl.put("f")
    cl.kill(replica_ids(plan)[0])
    ((t, _),) = cl.master.repair(NOW)
    cl.master.stored(t, "f", 1, True, "c0ffee")
    expected = cl.holders("f", 1)
    cl.master.db.close()
    second = cl.open(db)
    try:
        assert {h for h in second.files["f"][1].holders if h in cl.live} == expected
        assert second.under_replicated() == 0
    finally:
        second.db.close()


def test_journal_entries_rebuild_a_standby(c: Cluster) -> None:
    c.put("a")
    c.put("a")
    c.begin("b")
    c.master.delete("a")
    c.put("c")
    standby = SdfsMaster(c.cfg, lambda: dict(c.live))
    for op, data in c.journal:
        assert op == "sdfs.files"
        standby.apply_entries(data["entries"])
    assert standby.snapshot() == c.master.snapshot()
    assert [e["name"] for e in standby.ls("")] == ["c"]
    assert standby.begin_put([{"name": "a", "size": 1, "checksum": "x"}], NOW)[0]["version"] == 3


def test_report_bad_never_drops_the_last_live_replica() -> None:
    cl = Cluster(4)
    plan = cl.put("f")
    out = []
    for node in replica_ids(plan):  # a reader that cannot reach any data node reports them all
        out += cl.master.report_bad(node, "f", 1)
    assert cl.holders("f", 1), "no holder left: the file can never be repaired or read again"
    assert len(out) < RF


def test_repair_never_targets_a_node_already_repairing_the_same_version(c: Cluster) -> None:
    plan = c.put("f")
    ids = replica_ids(plan)
    c.kill(ids[0])
    ((t1, _),) = c.master.repair(NOW)
    (other,) = set(c.live) - set(ids) - {t1}
    c.master.node_report(other, [["load/x", 1, 1, "x"]])  # make t1 the least-loaded candidate
    c.kill(ids[1])
    out = [(t, m) for t, m in c.master.repair(NOW + 1) if m.name == "f"]  # ("load/x" is repaired too)
    assert [t for t, _ in out] == [other]  # t1 is still copying: not chosen twice
    assert all(sorted(m.sources) == sorted(c.live[h] for h in ids[2:]) for _, m in out)


# --------------------------------------------------------------------------------------------
# tombstones, reconciliation of stale metadata against node reports, incremental repair


def test_a_node_that_missed_the_delete_has_its_copy_dropped_and_the_file_stays_deleted(c: Cluster) -> None:
    plan = c.put("f")
    away, *others = replica_ids(plan)
    c.kill(away)
    count, out = c.master.delete("f")
    assert count == 1 and away not in {n for n, _ in out}  # nothing can reach it now
    tomb = c.master.tombs["f"]
    assert tomb.version == 1 and tomb.pending == {n.split("@")[0] for n in replica_ids(plan)}
    back = away.split("@")[0] + "@2"  # the same node (name), a new incarnation
    c.live[back] = addr(back)
    assert drops(c.master.node_report(back, [["f", 1, 10, "c0ffee"]])) == {(back, "f", 1)}
    assert "f" not in c.master.files and c.master.ls("") == []
    with pytest.raises(MasterError):
        c.master.locate("f", 1)
    assert away.split("@")[0] in c.master.tombs["f"].pending  # it still had the copy: not confirmed yet
    # Its next report (and the others') without the copy confirm the delete: the tombstone goes,
    # and the name is forgotten entirely.
    c.master.node_report(back, [])
    for o in others:
        assert "f" in c.master.tombs
        c.master.node_report(o, [])
    assert "f" not in c.master.tombs and "f" not in c.master.next_version
    assert c.master.tomb_pending == {}


def test_re_put_after_delete_gets_a_higher_version_and_old_copies_stay_dropped(c: Cluster) -> None:
    c.put("f")
    c.put("f")
    c.master.delete("f")
    plan = c.put("f", 5, "new")
    assert plan["version"] == 3
    node = next(n for n in c.live if n not in replica_ids(plan))
    out = c.master.node_report(node, [["f", 2, 10, "c0ffee"], ["f", 1, 10, "c0ffee"]])
    assert drops(out) == {(node, "f", 1), (node, "f", 2)}
    assert [(v["version"], v["checksum"]) for v in c.master.locate("f", 9)] == [(3, "new")]


def test_tombstones_travel_to_a_standby_and_a_promoted_standby_honours_them(c: Cluster) -> None:
    plan = c.put("f")
    c.master.delete("f")
    standby = SdfsMaster(c.cfg, lambda: dict(c.live))
    for _, data in c.journal:
        standby.apply_entries(data["entries"])
    restored = SdfsMaster(c.cfg, lambda: dict(c.live))
    restored.restore(c.master.snapshot())
    for m in (standby, restored):
        assert m.tombs["f"].version == 1
        node = replica_ids(plan)[0]
        assert drops(m.node_report(node, [["f", 1, 10, "c0ffee"]])) == {(node, "f", 1)}
        assert m.ls("") == []


def test_restore_replaces_everything_including_tombstones(c: Cluster) -> None:
    c.put("a")
    c.master.delete("a")
    c.put("b")
    c.master.restore({"entries": {"z": {"next_version": 2, "versions": [
        {"version": 1, "size": 1, "checksum": "z", "mtime": 0.0, "holders": ["n1@1"]}]}}})
    assert set(c.master.files) == {"z"} and c.master.tombs == {} and c.master.next_version == {"z": 2}
    assert c.master.held == {"n1": {("z", 1)}}


def test_stale_metadata_of_a_deleted_file_is_dropped_with_a_warning_when_nodes_report(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The issue's ghost: a coordinator restarts from metadata older than a delete. The nodes that
    held the file report their stores without it: the entry is dropped (with a warning), never served."""
    db = tmp_path / "meta.sqlite"
    cl = Cluster(6, db_path=db)
    plan = cl.put("ghost")
    cl.put("kept")
    cl.master.db.close()
    stale = tmp_path / "stale.sqlite"
    stale.write_bytes(db.read_bytes())  # metadata from before the delete
    cl.master = cl.open(db)
    cl.master.delete("ghost")  # the nodes dropped their copies
    cl.master.db.close()

    restarted = cl.open(stale)
    try:
        assert "ghost" in restarted.files  # stale: still there
        stores = {n: [["kept", 1, 10, "c0ffee"]] for n in cl.live}
        with caplog.at_level("WARNING", logger="idunno.sdfs.master"):
            for node, store in stores.items():
                assert restarted.node_report(node, store) == []
        assert "ghost" not in restarted.files
        assert [e["name"] for e in restarted.ls("")] == ["kept"]
        with pytest.raises(MasterError) as info:
            restarted.locate("ghost", 1)
        assert info.value.code == "not_found"
        assert any("ghost v1" in r.getMessage() and "no readable replica" in r.getMessage() for r in caplog.records)
        assert len(replica_ids(plan)) == RF
    finally:
        restarted.db.close()


def test_a_file_whose_holders_are_all_down_is_not_served_until_one_comes_back(c: Cluster) -> None:
    plan = c.put("f")
    c.put("g")
    for n in replica_ids(plan):
        c.kill(n)
    assert [e["name"] for e in c.master.ls("")] == (["g"] if c.holders("g", 1) else [])
    with pytest.raises(MasterError) as info:
        c.master.locate("f", 1)
    assert info.value.code == "unavailable"
    assert "f" in c.master.files  # kept: the nodes may come back with their disks
    assert c.master.info()["unavailable"] >= 1
    back = replica_ids(plan)[0].split("@")[0] + "@2"
    c.live[back] = addr(back)
    assert c.master.node_report(back, [["f", 1, 10, "c0ffee"]]) == []
    assert {r["node_id"] for r in c.master.locate("f", 1)[0]["replicas"]} == {back}


def test_a_new_incarnation_replaces_the_old_one_as_holder(c: Cluster) -> None:
    plan = c.put("f")
    old = replica_ids(plan)[0]
    new = old.split("@")[0] + "@7"
    del c.live[old]
    c.live[new] = addr(new)
    c.master.node_report(new, [["f", 1, 10, "c0ffee"]])
    holders = c.master.files["f"][1].holders
    assert new in holders and old not in holders


def test_a_node_back_with_an_empty_disk_is_no_longer_a_holder(c: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    plan = c.put("f")
    lost = replica_ids(plan)[0]
    back = lost.split("@")[0] + "@2"
    del c.live[lost]
    c.live[back] = addr(back)
    c.master.node_report(back, [])  # disk replaced
    assert not {h for h in c.master.files["f"][1].holders if h.split("@")[0] == lost.split("@")[0]}
    assert c.master.under_replicated() == 1
    assert len(c.master.repair(NOW)) == 1
    # The only holder of a version coming back empty: nothing can read it, the entry goes (warned).
    solo = Cluster(1)
    p = solo.put("only")
    node = replica_ids(p)[0]
    with caplog.at_level("WARNING", logger="idunno.sdfs.master"):
        solo.master.node_report(node.split("@")[0] + "@2", [])
    assert "only" not in solo.master.files
    assert any("only v1" in r.getMessage() for r in caplog.records)


def test_tombstone_expires_after_its_ttl_and_its_row_is_deleted(tmp_path: Path) -> None:
    db = tmp_path / "meta.sqlite"
    cl = Cluster(6, db_path=db, tombstone_ttl=100.0)
    clock = [1_000_000.0]
    cl.master.clock = lambda: clock[0]
    cl.put("f")
    cl.put("keep")
    cl.master.delete("f")
    cl.master.repair(NOW)
    assert "f" in cl.master.tombs  # nobody confirmed yet, TTL not reached
    clock[0] += 101
    cl.master.repair(NOW)
    assert "f" not in cl.master.tombs and "f" not in cl.master.next_version
    rows = {n for (n,) in cl.master.db.execute("SELECT name FROM files")}
    assert rows == {"keep"}
    cl.master.db.close()


def test_repair_examines_only_versions_that_changed() -> None:
    cl = Cluster(6)
    for i in range(50):
        cl.put(f"f{i}")
    assert cl.master.repair(NOW) == []
    assert cl.master.dirty == {}  # every version checked once, fully replicated: nothing left to look at
    victim = next(iter(cl.live))
    held = set(cl.master.held.get(victim.split("@")[0], ()))
    cl.kill(victim)
    assert set(cl.master.dirty) == held  # only the lost node's versions
    out = cl.master.repair(NOW)
    assert {(m.name, m.version) for _, m in out} == held
    for t, m in out:
        cl.master.stored(t, m.name, m.version, True, m.checksum)
    cl.master.repair(NOW + 1)
    assert cl.master.dirty == {} and cl.master.under_replicated() == 0
    # Fully replicated again: the copy on the node that is down is forgotten.
    assert all(victim not in v.holders for vs in cl.master.files.values() for v in vs.values())


def test_a_master_started_from_disk_lets_nodes_report_before_repairing(tmp_path: Path) -> None:
    db = tmp_path / "meta.sqlite"
    cl = Cluster(6, db_path=db)
    plan = cl.put("f")
    cl.master.db.close()
    for n in replica_ids(plan)[:2]:
        del cl.live[n]  # not rejoined yet
    second = cl.open(db)
    try:
        assert second.repair(NOW) == []  # the others may be about to report
        assert second.repair(NOW + cl.cfg.failure_timeout / 2) == []
        assert len(second.repair(NOW + cl.cfg.failure_timeout + 0.1)) == 2
    finally:
        second.db.close()


def test_a_big_change_set_is_journalled_in_ops_that_fit_a_frame() -> None:
    from sdfs.master import JOURNAL_BATCH  # noqa: PLC0415

    cl = Cluster(1)
    n = JOURNAL_BATCH * 2 + 5
    node = next(iter(cl.live))
    cl.master.node_report(node, [[f"x/{i}", 1, 1, "c"] for i in range(n)])
    sizes = [len(d["entries"]) for op, d in cl.journal if op == "sdfs.files"]
    assert sizes == [JOURNAL_BATCH, JOURNAL_BATCH, 5]


def test_a_version_held_by_two_incarnations_of_a_node_is_fully_forgotten_when_deleted(c: Cluster) -> None:
    """A repair may copy a version onto a node's new incarnation before that node's report replaces
    the old one as holder; deleting the version then must not leave it listed under the node's name
    (the node's next report looked it up and crashed the master with a KeyError)."""
    plan = c.put("f")
    old = replica_ids(plan)[0]
    new = old.split("@")[0] + "@2"
    c.kill(old)
    c.live[new] = addr(new)
    assert c.master.stored(new, "f", 1, True, "c0ffee") == []
    assert {old, new} <= c.master.files["f"][1].holders
    c.master.delete("f")
    assert old.split("@")[0] not in c.master.held
    assert c.master.node_report(new, []) == []
