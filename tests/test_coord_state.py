"""The coordinator's replicated state on its own: ops, the cost table, snapshot/restore derived from its parts."""

from __future__ import annotations

import pytest

from broker.jobs import Job, JobState
from broker.state import CostTable, ReplicatedState
from common.config import Config
from common.membership import MemberRegistry
from sdfs.master import SdfsMaster


def make_state(finished: list[str] | None = None, gone: list[str] | None = None) -> ReplicatedState:
    cfg = Config()
    registry = MemberRegistry(cfg.detector_params())
    master = SdfsMaster(cfg, dict, None)
    return ReplicatedState(cfg, registry, master, clock=lambda: 100.0, scheduler="fair-time",
                           on_finished=lambda job, ts: (finished if finished is not None else []).append(job.job_id),
                           on_task_gone=lambda task: (gone if gone is not None else []).append(task.task_id))


def add_job(state: ReplicatedState, n: int = 4, job_id: str = "job1-m") -> Job:
    state.apply_op("job.add", Job(job_id, "m", [(f"in/{i}", 1) for i in range(n)], 2, submitted=1.0).snapshot(), 0.0)
    state.apply_op("job.start", {"job_ids": [job_id], "ts": 2.0}, 0.0)
    return state.jobs.jobs[job_id]


def dispatch(state: ReplicatedState, task_id: str, indexes: list[int], worker: str = "w@1") -> None:
    state.apply_op("task.dispatch", {"task_id": task_id, "job_id": "job1-m", "worker": worker, "indexes": indexes,
                                     "dispatched": 3.0}, 0.0)


def result_op(task_id: str, indexes: list[int], worker: str = "w@1", final: bool = True) -> dict:
    rows = {str(i): {"input": f"in/{i}", "top5": [["a", 1.0]], "error": None} for i in indexes}
    return {"task_id": task_id, "job_id": "job1-m", "results": rows, "latency": 0.5, "elapsed": 0.4, "ts": 4.0,
            "worker": worker, "duplicates": 0, "final": final, "answered": len(indexes)}


def test_ops_take_a_job_from_submit_to_done_and_declare_it_finished_once():
    finished: list[str] = []
    state = make_state(finished)
    job = add_job(state)
    assert job.state is JobState.RUNNING and job.started == 2.0
    dispatch(state, "t1.1-job1-m", [0, 1])
    dispatch(state, "t1.2-job1-m", [2, 3])
    assert list(job.pending) == [] and state.jobs.in_flight(job.job_id) == 4
    state.apply_op("task.result", result_op("t1.1-job1-m", [0, 1]), 0.0)
    state.apply_op("task.result", result_op("t1.2-job1-m", [2, 3]), 0.0)
    assert job.state is JobState.DONE and job.completed == 4 and finished == [job.job_id]
    assert state.busy_seconds == {"w@1": pytest.approx(0.8)}
    assert state.costs.measured("m", "w@1") == pytest.approx(0.2)  # 0.4 s for 2 images, twice
    # A replayed op changes nothing more: no second finish, no second result.
    state.apply_op("task.result", result_op("t1.2-job1-m", [2, 3]), 0.0)
    assert job.completed == 4 and finished == [job.job_id] and job.stats.duplicates == 2


def test_a_partial_final_result_requeues_the_rest_and_refunds_only_what_was_charged():
    gone: list[str] = []
    state = make_state(gone=gone)
    job = add_job(state)
    dispatch(state, "t1.1-job1-m", [0, 1, 2])
    state.charge("t1.1-job1-m", job, 3)
    vtime = state.scheduler.vtime[job.job_id]
    state.apply_op("task.result", result_op("t1.1-job1-m", [0]), 0.0)
    assert list(job.pending) == [1, 2, 3]
    assert state.scheduler.vtime[job.job_id] == pytest.approx(vtime - 2)  # the two unanswered ones refunded
    dispatch(state, "t1.2-job1-m", [1])
    state.apply_op("task.requeue", {"task_id": "t1.2-job1-m"}, 0.0)
    assert gone == ["t1.2-job1-m"] and list(job.pending)[:1] == [1]


def test_snapshot_and_restore_are_derived_from_the_parts_and_reset_everything_else():
    state = make_state()
    job = add_job(state, n=6)
    dispatch(state, "t1.1-job1-m", [0, 1])
    state.charge("t1.1-job1-m", job, 2)
    state.apply_op("task.result", result_op("t1.1-job1-m", [0, 1]), 0.0)
    dispatch(state, "t1.2-job1-m", [2, 3])
    state.apply_op("event", {"ts": 5.0, "kind": "x", "detail": "y"}, 0.0)
    snap = state.snapshot()
    assert set(snap) == set(state.parts()) | {"jobs", "sdfs"}  # one table, nothing listed beside it

    other = make_state()
    add_job(other, n=2, job_id="job9-m")
    other.charge("t9-job9-m", other.jobs.jobs["job9-m"], 2)
    other.busy_seconds["old@1"] = 5.0
    other.restore(snap, 0.0)
    assert other.snapshot() == snap
    assert "job9-m" not in other.jobs.jobs and other.charged == {} and other.busy_seconds == {}
    assert other.scheduler.vtime == {}
    restored = other.jobs.jobs[job.job_id]
    # The in-flight task is back in the task table, its queries not pending, its dispatch not counted twice.
    assert set(other.jobs.tasks) == {"t1.2-job1-m"} and list(restored.pending) == [4, 5]
    assert restored.counts == job.counts and list(restored.counts.dispatches) == [1, 1, 1, 1, 0, 0]
    assert other.costs.dump() == state.costs.dump() == {"m": {"w@1": pytest.approx(0.2)}}


def test_cost_table_falls_back_from_the_worker_to_the_cluster_and_reads_the_old_format():
    costs = CostTable()
    assert costs.of("m", "a") == 0.0
    costs.observe("m", "a", 1.0)
    costs.observe("m", "a", 2.0)
    costs.observe("m", "b", 3.0)
    assert costs.measured("m", "a") == pytest.approx(1.2)
    assert costs.of("m", "b") == 3.0 and costs.of("m", "c") == pytest.approx(2.1) and costs.measured("m", "c") == 0
    assert costs.of_worker("a") == pytest.approx(1.2) and costs.per_model() == {"m": pytest.approx(2.1)}
    costs.load({"old": 0.5})  # a state store written before the table: one figure per model
    assert costs.of("old", "anyone") == 0.5


def test_an_unknown_op_is_ignored():
    state = make_state()
    before = state.snapshot()
    state.apply_op("no.such.op", {}, 0.0)
    assert state.snapshot() == before


def test_requeue_of_an_unknown_task_does_nothing():
    gone: list[str] = []
    state = make_state(gone=gone)
    add_job(state)
    state.apply_op("task.requeue", {"task_id": "t1.7-job1-m"}, 0.0)
    assert gone == [] and list(state.jobs.jobs["job1-m"].pending) == [0, 1, 2, 3]
