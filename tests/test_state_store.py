"""The coordinator's durable state: the SQLite op journal, compaction, lineages, damage, and a
coordinator restarted from it (in-memory transport, virtual time)."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import msgpack
import pytest
from simcluster import SimCluster

from broker.coordinator import PRIMARY, STANDBY, Coordinator
from broker.jobs import JobState
from broker.state_store import StateStore, StateStoreError
from common.config import Config
from common.modelnames import MODEL_NAMES
from common.protocol import Join, Ready


def crash(store: StateStore) -> None:
    """The process dies: its open transaction is gone, nothing more is written."""
    store._work.put(None)
    store._thread.join(timeout=30)
    store.db.close()


def ops_of(store: StateStore) -> tuple[list, object]:
    loaded = store.load()
    return list(store.journal_ops(loaded.seq, loaded)), loaded


def test_journal_appends_commit_and_replay_in_order(tmp_path):
    path = tmp_path / "state.sqlite"
    s = StateStore(path)
    for seq in range(1, 6):
        s.append(seq, 3, "event", {"n": seq, "blob": b"\x00\x01"})
    s.commit(5)
    s.append(6, 3, "event", {"n": 6})  # never committed: the process dies here
    crash(s)
    s2 = StateStore(path)
    ops, loaded = ops_of(s2)
    assert [(seq, term, op, d["n"]) for seq, term, op, d in ops] == [(i, 3, "event", i) for i in range(1, 6)]
    assert ops[0][3]["blob"] == b"\x00\x01"
    assert loaded.last_seq == 5 and loaded.term == 3 and loaded.skipped == 0
    s2.close()


def test_commit_records_seq_of_ops_that_are_not_stored(tmp_path):
    s = StateStore(tmp_path / "s.sqlite")
    s.append(1, 1, "event", {})
    s.commit(9)  # seqs 2..9 went to SDFS ops, which the master persists itself
    s.close()
    s = StateStore(tmp_path / "s.sqlite")
    ops, loaded = ops_of(s)
    assert len(ops) == 1 and loaded.last_seq == 9  # a restarted primary never reuses a seq
    s.close()


def test_compaction_snapshots_in_parts_truncates_the_journal_and_restores(tmp_path):
    path = tmp_path / "s.sqlite"
    s = StateStore(path, chunk_bytes=1024, compact_ops=10)
    for seq in range(1, 12):
        s.append(seq, 2, "event", {"n": seq})
    s.commit(11)
    assert s.should_compact()
    big = {"job_id": "job1-noop", "results": {str(i): "r" * 50 for i in range(400)}}  # ~25 kB: many parts
    s.compact(11, 2, [("members", {"members": []}), ("job", big), ("tasks", [])])
    assert not s.should_compact()  # one at a time
    for seq in range(12, 15):  # the loop goes on while the snapshot is written
        s.append(seq, 2, "event", {"n": seq})
        s.commit(seq)
    assert s.wait_idle(30)
    parts = s.db.execute("SELECT COUNT(*) FROM snapshot_rows WHERE item = 1").fetchone()[0]
    assert parts > 10
    left = [r[0] for r in s.db.execute("SELECT seq FROM journal ORDER BY seq")]
    assert left == [12, 13, 14]
    s.close()
    s = StateStore(path)
    ops, loaded = ops_of(s)
    assert loaded.seq == 11 and dict(loaded.items)["job"] == big
    assert [o[0] for o in ops] == [12, 13, 14] and loaded.last_seq == 14
    s.close()


def test_an_installed_snapshot_starts_a_new_lineage_old_history_used_until_it_is_on_disk(tmp_path):
    path = tmp_path / "s.sqlite"
    s = StateStore(path)
    for seq in range(1, 4):
        s.append(seq, 1, "event", {"old": seq})
    s.commit(3)
    s.new_lineage(50)  # the primary's snapshot at seq 50 is being installed ...
    s.append(51, 2, "event", {"new": 51})
    s.commit(51)
    crash(s)  # ... and the process dies before that snapshot is written
    crashed = StateStore(path)
    ops, loaded = ops_of(crashed)
    assert [o[3] for o in ops] == [{"old": 1}, {"old": 2}, {"old": 3}]  # the old, consistent history
    crashed.close()
    s = StateStore(path)
    s.load()
    s.new_lineage(50)
    s.compact(50, 2, [("cost", {"noop": 0.1})])
    s.append(51, 2, "event", {"new": 51})
    s.commit(51)
    assert s.wait_idle(30)
    s.close()
    s = StateStore(path)
    ops, loaded = ops_of(s)
    assert loaded.seq == 50 and dict(loaded.items) == {"cost": {"noop": 0.1}}
    assert [o[3] for o in ops] == [{"new": 51}]
    assert s.db.execute("SELECT COUNT(*) FROM journal WHERE seq <= 3").fetchone()[0] == 0
    s.close()


def test_corrupt_rows_are_skipped_with_a_warning_never_a_crash(tmp_path, caplog):
    path = tmp_path / "s.sqlite"
    s = StateStore(path, chunk_bytes=1024)
    s.compact(0, 1, [("job", {"job_id": "a"}), ("job", {"job_id": "b", "x": "y" * 3000}), ("cost", {})])
    assert s.wait_idle(30)
    for seq in range(1, 5):
        s.append(seq, 1, "event", {"n": seq})
        s.commit(seq)  # one op per commit: a row of its own
    for last in (8, 10):  # several ops per commit: one row holding them (ops 5-8, then 9-10)
        for seq in range(last - 3 if last == 8 else 9, last + 1):
            s.append(seq, 1, "event", {"n": seq})
        s.commit(last)
    s.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT seq, op FROM journal ORDER BY seq").fetchall() == [
        (1, "event"), (2, "event"), (3, "event"), (4, "event"), (8, "ops"), (10, "ops")]
    db.execute("UPDATE journal SET data = x'c1ff' WHERE seq = 2")  # not msgpack
    db.execute("UPDATE journal SET data = x'01' WHERE seq = 3")  # msgpack, but not an op
    batch = msgpack.unpackb(db.execute("SELECT data FROM journal WHERE seq = 8").fetchone()[0])
    batch[1][3] = b"\xc1\xff"  # op 6's data is not msgpack
    batch[2] = "not an op"  # op 7 is not an entry at all
    db.execute("UPDATE journal SET data = ? WHERE seq = 8", (msgpack.packb(batch),))
    db.execute("UPDATE journal SET data = x'c1' WHERE seq = 10")  # the whole row of ops 9-10
    db.execute("DELETE FROM snapshot_rows WHERE item = 1 AND part = 1")  # a part of job b is gone
    db.execute("UPDATE snapshot_rows SET data = x'93' WHERE item = 0")  # job a truncated
    db.commit()
    db.close()
    caplog.set_level(logging.WARNING, "idunno.coordinator.store")
    s = StateStore(path)
    ops, loaded = ops_of(s)
    assert [o[0] for o in ops] == [1, 4, 5, 8]  # a corrupt op costs that op; a corrupt row, its ops
    assert [o[3]["n"] for o in ops] == [1, 4, 5, 8]
    assert loaded.items == [("cost", {})]
    assert loaded.skipped == 7
    assert sum("corrupt" in r.getMessage() for r in caplog.records) == 7
    s.close()


def test_a_format_1_file_is_read_and_upgraded_and_an_unknown_format_is_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    s = StateStore(path)
    s.append(1, 1, "event", {"n": 1})
    s.commit(1)  # a row per op, as format 1 wrote every op
    s.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = 1 WHERE key = 'format'")
    db.commit()
    db.close()
    s = StateStore(path)
    s.load()
    for seq in (2, 3):
        s.append(seq, 1, "event", {"n": seq})
    s.commit(3)
    s.close()
    s = StateStore(path)
    assert [o[0] for o in ops_of(s)[0]] == [1, 2, 3]
    assert StateStore._meta(s.db, "format") == 2
    s.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = 3 WHERE key = 'format'")
    db.commit()
    db.close()
    with pytest.raises(StateStoreError, match="state format 3, this version reads 1, 2"):
        StateStore(path)


def test_a_torn_wal_tail_loses_only_the_last_commit(tmp_path):
    path = tmp_path / "s.sqlite"
    s = StateStore(path)
    for seq in range(1, 31):
        s.append(seq, 1, "event", {"n": seq, "pad": "p" * 3000})
        s.commit(seq)  # one commit each: the WAL holds 30 transactions
    # Copy the files as a power cut would leave them (open connections, no checkpoint), then tear
    # the last frame of the WAL in half.
    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in ("", "-wal"):
        shutil.copy(f"{path}{suffix}", copy / f"s.sqlite{suffix}")
    crash(s)
    wal = copy / "s.sqlite-wal"
    size = wal.stat().st_size
    assert size > 4096
    with open(wal, "r+b") as fh:
        fh.truncate(size - 2000)
    t = StateStore(copy / "s.sqlite")
    ops, _ = ops_of(t)
    seqs = [o[0] for o in ops]
    assert seqs == list(range(1, len(seqs) + 1)) and 20 <= len(seqs) < 30  # a prefix, nothing made up
    t.close()


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not sqlite" * 1000)
    with pytest.raises(StateStoreError, match="Move it aside"):
        StateStore(path)


# ----------------------------------------------------------------------------------------------
# a coordinator restarted from its store


def restart(sim: SimCluster, path: Path, clean: bool = False) -> dict:
    """Replace the simulated coordinator by a new one over the same state store (both "died")."""
    old = sim.core
    if clean:
        old.commit()
    crash(old.store)
    new = Coordinator(sim.cfg, "sim:1", sim.net, role=STANDBY, term=old.term, clock=old.clock,
                      models=MODEL_NAMES | sim.costs.keys(), store=StateStore(path))
    info = new.load_state(sim.t)
    new.role = PRIMARY
    new.term += 1
    new.take_over(sim.t)
    sim.core = new
    for node in sim.workers:  # the workers follow the new term and re-attach
        sim.deliver(node, Join(node, "worker", node.split("@")[0]))
        sim.deliver(node, Ready(node, sim.cfg.worker_credit, []))
    return info


def test_a_restarted_coordinator_resumes_a_running_job_exactly_once_and_counts_on(tmp_path):
    sim = SimCluster({"m": 0.05}, speeds=[1, 1, 1])
    path = tmp_path / "state.sqlite"
    sim.core.store = StateStore(path)
    sim.add_inputs("in", 300)
    done_job = sim.command("submit", model="m", inputs="in/img0000", batch=4, start=True)["job_id"]
    job = sim.command("submit", model="m", inputs="in/", batch=4, start=True)["job_id"]
    sim.run_until(3.0)
    seen = sim.command("query_rate", job=job)["jobs"][job]["count"]  # a command commits first
    sim.run_until(3.2)  # results after the last commit are lost with the process ...
    assert sim.core.jobs.jobs[done_job].state is JobState.DONE
    assert 0 < seen < 300 and sim.core.jobs.tasks
    term = sim.core.term
    info = restart(sim, path)
    assert info["requeued"] > 0
    core = sim.core
    assert core.term == term + 1
    assert len(core.jobs.jobs[job].results) == seen  # ... but never what a client was told
    assert core.jobs.jobs[done_job].state is JobState.DONE and len(core.jobs.jobs[done_job].results) == 10
    assert core.jobs.jobs[job].stats.latencies.count == seen
    assert all(t.startswith(f"t{term + 1}.") for t in core.jobs.tasks)  # the crash's in-flight ones re-queued
    sim.run_until(30.0)
    j = core.jobs.jobs[job]
    assert j.state is JobState.DONE
    per_input = Counter(r["input"] for r in j.rows())
    assert len(per_input) == 300 and set(per_input.values()) == {1}
    assert set(j.counts.accepted) == {1}  # accepted once each, across the restart (the journal replayed)
    rate = sim.command("query_rate", job=job)["jobs"][job]
    assert rate["count"] == 300 and j.stats.latencies.count == 300
    assert sim.command("query_time", job=job)[job]["latency"]["count"] == 300
    # The next job id follows the restored ones (SDFS metadata lives in the master's own SQLite,
    # which this simulated restart does not have: the workers report their files again).
    sim.add_inputs("in", 10)
    nxt = sim.command("submit", model="m", inputs="in/img0000", batch=4)["job_id"]
    assert nxt.startswith("job3-")


def test_restart_after_compaction_and_twice_in_a_row(tmp_path):
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, state_compact_ops=50)
    sim = SimCluster({"m": 0.02}, speeds=[1, 1], cfg=cfg)
    path = tmp_path / "state.sqlite"
    sim.core.store = StateStore(path, compact_ops=cfg.state_compact_ops)
    sim.add_inputs("in", 400)
    job = sim.command("submit", model="m", inputs="in/", batch=2, start=True)["job_id"]
    compactions = 0
    for k in range(20):
        sim.run_until(0.2 * (k + 1))
        sim.core.commit()
        compactions += sim.core.maybe_compact()
        sim.core.store.wait_idle(30)
    assert compactions >= 2
    info = sim.command("info")["state_store"]
    assert info["compactions"] == compactions and info["journal_ops"] < 50 and not info["compacting"]
    before = len(sim.core.jobs.jobs[job].results)
    restart(sim, path, clean=True)
    assert len(sim.core.jobs.jobs[job].results) == before
    sim.run_until(5.0)
    restart(sim, path)  # again, before anything is compacted
    assert len(sim.core.jobs.jobs[job].results) >= before
    sim.run_until(30.0)
    j = sim.core.jobs.jobs[job]
    assert j.state is JobState.DONE and len(j.results) == 400
    assert sorted(j.results) == list(range(400))


def test_term_is_persisted_before_it_is_announced():
    saved: list[int] = []
    published: list[int] = []

    class Net:
        def send(self, identity, msg):
            return True

        def publish(self, topic, msg):
            published.append((len(saved), getattr(msg, "term", None)))

    core = Coordinator(Config(), "c:1", Net(), role=STANDBY, term=4, persist_term=saved.append)
    assert saved == []  # the caller loaded 4 from disk: nothing to write
    core.promote(0.0)
    assert saved == [5]
    assert all(n >= 1 for n, _ in published)  # every message after the write
    core.term = max(core.term, 3)  # hearing an older term writes nothing
    assert saved == [5]


# ----------------------------------------------------------------------------------------------
# results files: owed by whichever coordinator is primary, retried until written


def test_a_new_primary_writes_every_finished_job_not_recorded_as_written():
    owed: list[str] = []
    core = Coordinator(Config(), "c:1", SimCluster({}, []).net, role=STANDBY,
                       on_job_done=lambda j: owed.append(j.job_id))
    for k, state in enumerate(("done", "done", "running", "cancelled")):
        core.apply_op("job.add", {"job_id": f"job{k}-noop", "model": "noop", "inputs": [["in/a", 1]],
                                  "batch_size": 1, "state": state, "submitted": 0.0,
                                  "finished": None if state == "running" else 1.0}, 0.0)
    core.apply_op("job.results_written", {"job_id": "job1-noop", "version": 1}, 0.0)
    assert owed == []  # a standby writes nothing
    core.promote(0.0)
    assert owed == ["job0-noop", "job3-noop"]
    assert core.results_written("job0-noop", 2, 0.0)
    assert not core.results_written("job0-noop", 3, 0.0)  # at most one recorded write per job
    assert core.jobs.jobs["job0-noop"].results_version == 2
    core.role = STANDBY
    assert not core.results_written("job3-noop", 1, 0.0)  # only a primary records


def test_result_writer_retries_until_the_write_succeeds_and_stops_when_not_primary(tmp_path, caplog):
    from broker.server import ResultWriter  # noqa: PLC0415

    class FlakyClient:
        calls = 0

        def put(self, local, name):
            FlakyClient.calls += 1
            assert Path(local).read_text().startswith('{"job": "job1-noop"')
            if FlakyClient.calls < 4:
                raise OSError("no storage node is alive")
            return 7

    w = ResultWriter(Config(), "127.0.0.1:1", tmp_path / "spool")
    w.BACKOFF_FIRST = 0.01
    caplog.set_level(logging.WARNING, "idunno.coordinator.server")
    w._write(FlakyClient(), "job1-noop", {"job": "job1-noop", "model": "noop", "results": [{"qid": "job1-noop:0"}]})
    assert w.written() == [("job1-noop", 7)] and w.failures == 3
    assert sum("writing results of job1-noop failed" in r.getMessage() for r in caplog.records) == 3
    assert not list((tmp_path / "spool").iterdir())  # the staging file is gone
    w.active = False  # demoted: the new primary owes the write
    FlakyClient.calls = -100
    w._write(FlakyClient(), "job2-noop", {"job": "job2-noop", "model": "noop", "results": []})
    assert w.written() == [] and FlakyClient.calls == -100
    w.stop()


def test_a_first_install_that_never_reached_the_disk_is_not_replayed_onto_nothing(tmp_path):
    path = tmp_path / "s.sqlite"
    s = StateStore(path)
    s.load()
    s.new_lineage(70)  # a fresh standby installs the primary's snapshot at seq 70 ...
    s.append(71, 1, "event", {"n": 71})
    s.commit(71)
    crash(s)  # ... and dies before the snapshot is written
    s = StateStore(path)
    ops, loaded = ops_of(s)
    assert ops == [] and loaded.items == [] and s.lineage == 0
    s.close()


def test_a_standby_keeps_the_primary_snapshot_and_stream_and_restarts_from_them(tmp_path):
    sim = SimCluster({"m": 0.05}, speeds=[1, 1])
    sim.add_inputs("in", 100)
    job = sim.command("submit", model="m", inputs="in/", batch=4, start=True)["job_id"]
    sim.run_until(1.0)
    path = tmp_path / "standby.sqlite"
    standby = Coordinator(sim.cfg, "sb:1", SimCluster({}, []).net, role=STANDBY, store=StateStore(path))
    standby.load_state(0.0)
    standby.restore(sim.core.snapshot(), sim.core.state_seq, sim.core.term, sim.t)  # the initial sync
    seq0 = sim.core.state_seq
    sim.run_until(2.0)
    from simcluster import state_updates  # noqa: PLC0415

    sim.core.log.publish()
    for u in state_updates(sim.net.published):
        if u.seq > seq0:
            standby.apply_update(u.seq, u.term, u.op, u.data, sim.t)
    standby.commit()
    assert standby.store.wait_idle(30)
    assert len(standby.jobs.jobs[job].results) == len(sim.core.jobs.jobs[job].results) > 0
    crash(standby.store)
    again = Coordinator(sim.cfg, "sb:1", SimCluster({}, []).net, role=STANDBY, store=StateStore(path))
    info = again.load_state(sim.t)
    # Its in-flight tasks were re-queued at start, as journaled ops of its own.
    assert info["skipped"] == 0 and info["requeued"] > 0
    assert again.state_seq == sim.core.state_seq + info["requeued"]
    assert sorted(again.jobs.jobs[job].results) == sorted(sim.core.jobs.jobs[job].results)
    assert again.jobs.jobs[job].stats.latencies.count == sim.core.jobs.jobs[job].stats.latencies.count


def test_the_loop_commits_queued_ops_within_the_group_commit_interval_even_when_idle(tmp_path):
    """Group commit (CoordinatorServer._durability): ops wait at most ``state_commit_interval`` for
    their transaction, and an idle loop wakes up for it (its poll timeout includes the deadline)."""
    import time  # noqa: PLC0415

    from broker.server import CoordinatorServer  # noqa: PLC0415
    from cli.cluster import free_port_block  # noqa: PLC0415

    cfg = Config(insecure=True, state_commit_interval=0.2, data_dir=str(tmp_path))
    srv = CoordinatorServer(cfg, f"127.0.0.1:{free_port_block()}", data_dir=str(tmp_path / "c"))
    try:
        t0 = time.monotonic()
        srv.step(t0)  # as the loop runs: now primary (no peer), nothing queued
        srv.core.event("test", "one", t0)
        srv._durability(t0)
        assert len(srv.store.rows) == 1 and srv.commit_due == pytest.approx(t0 + 0.2)
        srv._durability(t0 + 0.1)  # within the interval: still queued
        assert len(srv.store.rows) == 1
        assert srv.poll_timeout(t0 + 0.19) <= 0.01 + 1e-9  # an idle loop wakes up for the commit
        while srv.store.rows and time.monotonic() - t0 < 10:
            srv.step(time.monotonic())
        assert not srv.store.rows and srv.commit_due is None
        assert time.monotonic() - t0 >= 0.2  # not before its time
        kinds = [op["kind"] for _, _, name, op in ops_of(srv.store)[0] if name == "event"]
        assert kinds[-1] == "test"
    finally:
        srv.close()
