"""Exactly-once, counted where it can fail: the coordinator's per-query counts of dispatches,
arrivals and acceptances, and the checker that the chaos and failover tests use on them."""

from __future__ import annotations

from chaos.checks import exactly_once
from simcluster import WHOLE_BATCHES, SimCluster

from broker.jobs import JobTable
from common.protocol import Task, TaskResult

CHEAP = "cheap"


class ReplayingWorker:
    """A worker test double that answers a task and then sends the very same TaskResult again
    (as a worker does whose ResultAck was lost, or a network that duplicates a frame)."""

    def __init__(self, sim: SimCluster, node: str) -> None:
        self.sim, self.node = sim, node

    def answer(self, task: Task, replays: int = 1) -> TaskResult:
        rows = [[q["index"], [["a", 1.0]], None] for q in task.queries]
        result = TaskResult(task.task_id, task.job_id, self.node, 0.01, rows)
        for _ in range(1 + replays):
            self.sim.deliver(self.node, result)
        return result


def run_with_one_replay(sim: SimCluster) -> tuple[str, Task]:
    sim.add_inputs("in", 8)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    node = next(iter(sim.workers))
    replayed = sim.workers[node].received[0]
    sim.events = [e for e in sim.events if e.task.task_id != replayed.task_id]  # the double answers this one
    ReplayingWorker(sim, node).answer(replayed)
    sim.run_until(5.0)
    return job, replayed


def test_a_replayed_result_is_accepted_once_and_reported_as_a_dropped_duplicate():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1], cfg=WHOLE_BATCHES)
    job, replayed = run_with_one_replay(sim)
    j = sim.core.jobs.jobs[job]
    assert j.state == "done" and j.completed == 8
    first = [q["index"] for q in replayed.queries]
    assert [j.counts.arrivals[i] for i in first] == [2] * 4 and [j.counts.accepted[i] for i in first] == [1] * 4
    rows = sim.command("results", job=job)["results"]
    assert {(r["dispatches"], r["arrivals"], r["accepted"]) for r in rows if int(r["qid"].split(":")[1]) in first} \
        == {(1, 2, 1)}
    totals = sim.command("jobs")[0]
    assert (totals["dispatches"], totals["arrivals"], totals["accepted"]) == (8, 12, 8)
    check = exactly_once(job, rows, 8)
    assert check.ok, check.problems
    assert check.dropped_duplicates == 4  # the replay: seen, counted, not accepted


def test_the_checker_fails_on_a_duplicate_the_coordinator_accepted(monkeypatch):
    record = JobTable.record

    def record_replays_twice(self, job, results, task=None):
        # The bug this guards against: a recording path that stores an answer it already holds.
        fresh = record(self, job, results, task)
        for i in results:
            if i not in fresh and i in job.results:
                job.results[i] = results[i]  # the replay recorded over the first answer...
                job.counts.accepted[i] += 1  # ...which the recording function counts
        return fresh

    monkeypatch.setattr(JobTable, "record", record_replays_twice)
    sim = SimCluster({CHEAP: 0.01}, speeds=[1], cfg=WHOLE_BATCHES)
    job, _replayed = run_with_one_replay(sim)
    rows = sim.command("results", job=job)["results"]
    assert len({r["qid"] for r in rows}) == 8  # a map keyed by query cannot show the duplicate...
    check = exactly_once(job, rows, 8)
    assert not check.ok  # ...the counts do
    assert sum("accepted 2 times" in p for p in check.problems) == 4, check.problems


def test_the_checker_reports_lost_and_repeated_rows():
    row = {"qid": "j:0", "dispatches": 1, "arrivals": 1, "accepted": 1}
    check = exactly_once("j", [row, dict(row)], 3)
    assert not check.ok and any("more than once" in p for p in check.problems)
    assert any("2 inputs without a result" in p for p in check.problems)
    assert exactly_once("j", [row], 1).ok
