"""Worker sessions and dispatch (broker/dispatch.py) over the in-memory transport."""

from __future__ import annotations

from dataclasses import replace

import pytest
from simcluster import WHOLE_BATCHES, SimCluster

from broker.dispatch import RESCAN, Dispatcher
from common.config import Config
from common.protocol import Pulse, TaskResult

CHEAP = "cheap"


def answers(task) -> list[dict]:
    return [[q["index"], [["a", 1.0]], None] for q in task.queries]


def test_slow_start_grows_a_new_jobs_batches_up_to_its_batch_size():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1], cfg=Config(heartbeat_interval=1000.0, task_timeout_min=1e6,
                                                           worker_credit=1, stream_interval=0.0))
    sim.add_inputs("in", 40)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=8, start=True)["job_id"]
    sim.run_until(10.0)
    sizes = [n for _t, j, _w, n in sim.dispatches if j == job]
    assert sizes[:5] == [1, 1, 2, 4, 8] and max(sizes) == 8 and sum(sizes) == 40


def test_auto_batch_follows_the_workers_measured_cost_and_the_latency_target():
    sim = SimCluster({CHEAP: 0.05}, speeds=[1], cfg=WHOLE_BATCHES)
    d: Dispatcher = sim.core.dispatcher
    sim.add_inputs("in", 30)
    job_id = sim.command("submit", model=CHEAP, inputs="in/", batch="auto", latency_target=0.2, start=True)["job_id"]
    node = next(iter(sim.workers))
    job = sim.core.jobs.jobs[job_id]
    assert d.sizer.batch_for(job, node) == 1  # nothing measured yet
    sim.run_until(5.0)
    assert sim.core.state.costs.measured(CHEAP, node) == pytest.approx(0.05)
    assert d.sizer.batch_for(job, node) == 4  # 0.2 s / 0.05 s per image
    assert d.sizer.batch_for(job, "never-ran@1") == 4  # the cluster's figure for a worker that has none
    # The deadline: ten times the task's compute and what may wait ahead of it (prefetch_lead, 0.5 s,
    # or one more task of its size), whatever the credit.
    d.sizer.cfg = replace(sim.cfg, task_timeout_min=1.0, worker_credit=8)
    assert d.sizer.task_timeout(job, node, 4) == pytest.approx(10 * (0.2 + 0.5))
    assert d.sizer.task_timeout(job, node, 40) == pytest.approx(10 * (2.0 + 2.0))
    assert d.sizer.task_timeout(job, node, 1) == pytest.approx(10 * (0.05 + 0.5))


def test_credit_is_slots_minus_tasks_held_and_a_result_frees_its_slot():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1], cfg=WHOLE_BATCHES)
    sim.add_inputs("in", 40)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    node = next(iter(sim.workers))
    slot = sim.core.dispatcher.slots[node]
    assert len(slot.outstanding) == sim.cfg.worker_credit and slot.credit == 0
    first = sim.workers[node].received[0]
    sim.events.clear()
    sim.deliver(node, TaskResult(first.task_id, job, node, 0.04, answers(first)))
    # The freed slot was refilled at once by the next batch.
    assert first.task_id not in slot.outstanding and len(slot.outstanding) == sim.cfg.worker_credit
    assert len(sim.workers[node].received) == sim.cfg.worker_credit + 1


def test_an_expired_task_is_requeued_and_no_longer_holds_its_slot():
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=5.0, worker_credit=1, slow_start=False,
                 stream_interval=0.0)
    sim = SimCluster({CHEAP: 0.01}, speeds=[1], cfg=cfg)
    sim.add_inputs("in", 4)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    node = next(iter(sim.workers))
    lost = sim.workers[node].received[0]
    sim.events.clear()  # the worker never answers
    sim.core.dispatcher.expire(sim.t + 1000.0)
    assert lost.task_id not in sim.core.jobs.tasks
    assert lost.task_id not in sim.core.dispatcher.slots[node].outstanding
    assert list(sim.core.jobs.jobs[job].counts.dispatches) == [1, 1, 1, 1]
    assert list(sim.core.jobs.jobs[job].pending) == [0, 1, 2, 3]


def test_a_result_for_another_workers_task_or_a_foreign_job_is_dropped_and_counted():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1, 1], cfg=WHOLE_BATCHES)
    sim.add_inputs("in", 8)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    a, b = list(sim.workers)
    task = sim.workers[a].received[0]
    sim.deliver(b, TaskResult(task.task_id, job, b, 0.01, answers(task)))
    sim.deliver(a, TaskResult(task.task_id, "job99-none", a, 0.01, answers(task)))
    assert sim.core.dropped == {"bad_result": 2}
    assert sim.core.jobs.jobs[job].completed == 0 and task.task_id in sim.core.jobs.tasks


def test_nothing_is_dispatched_by_a_standby():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1], cfg=WHOLE_BATCHES)
    sim.add_inputs("in", 8)
    sim.command("submit", model=CHEAP, inputs="in/", batch=4)
    sim.core.role = "standby"
    sim.core.emit("job.start", {"job_ids": list(sim.core.jobs.jobs), "ts": 0.0}, sim.t)
    sim.core.dispatcher.dispatch(sim.t)
    assert sim.core.jobs.tasks == {} and sim.dispatches == []


def test_a_pass_checks_the_workers_that_changed_and_every_worker_once_per_rescan():
    # 100 busy workers: a result from one of them must not make the pass check all 100 (that made
    # dispatch O(workers) per result), yet a change that reached no worker's path is still found.
    sim = SimCluster({CHEAP: 0.5}, speeds=[1] * 100, cfg=WHOLE_BATCHES)
    sim.add_inputs("in", 1000)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    d: Dispatcher = sim.core.dispatcher
    checked: list[str] = []
    eligible = d.eligible
    d.eligible = lambda node, slot, now: checked.append(node) or eligible(node, slot, now)  # type: ignore[method-assign]
    node = next(iter(sim.workers))
    task = sim.workers[node].received[0]
    d.scan.rescan_at = sim.t + RESCAN  # no safety-net scan due
    d.dispatch(sim.t)  # settles the workers touched by being sent their first tasks (each checked once)
    assert len(checked) == 100
    checked.clear()
    sim.deliver(node, TaskResult(task.task_id, job, node, 2.0, answers(task)))
    assert node in checked and len(checked) <= 3, checked  # the worker that answered (+ any still free)
    # A pulse sidecar (its own identity) changes no slot: no full scan for it (1,000 of them a second).
    sim.deliver(f"{node}/pulse", Pulse(node))
    assert d.scan.rescan_at == sim.t + RESCAN
    assert len(sim.workers[node].received) == 3  # its freed slot was refilled (two Tasks, then one more)
    # A slot freed behind the dispatcher's back (no message, no task taken back) waits for the rescan.
    other = list(sim.workers)[1]
    d.slots[other].outstanding.popitem()
    checked.clear()
    d.dispatch(sim.t)
    assert other not in checked and len(sim.workers[other].received) == 2
    sim.command("jobs")  # any command: the next pass checks every worker (a safety net, as the rescan)
    d.dispatch(sim.t)
    sim._route()
    assert set(checked) == set(sim.workers) and len(sim.workers[other].received) == 3


def deep_sim(cost: float, credit: int, workers: int, inputs: int) -> SimCluster:
    """Workers offering ``credit`` slots, a model of ``cost`` s per image, whole-task answers."""
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=credit, slow_start=False,
                 stream_interval=0.0)
    sim = SimCluster({CHEAP: cost}, speeds=[1] * workers, cfg=cfg)
    sim.add_inputs("in", inputs)
    return sim


def most_held(cost: float, credit: int) -> tuple[int, int]:
    """(tasks each worker holds right after the job starts, the most any worker held in the run) of
    a batch-1 job of a model costing ``cost`` s per image, on 2 workers offering ``credit`` slots."""
    sim = deep_sim(cost, credit, workers=2, inputs=60)
    slots = sim.core.dispatcher.slots
    most, route = 0, sim._route

    def tracking() -> None:
        nonlocal most
        route()
        most = max([most, *(len(s.outstanding) for s in slots.values())])

    sim._route = tracking  # type: ignore[method-assign]
    sim.command("submit", model=CHEAP, inputs="in/", batch=1, start=True)
    at_start = {len(s.outstanding) for s in slots.values()}
    sim.run_until(200 * cost)
    assert len(sim.core.jobs.jobs[next(iter(sim.core.jobs.jobs))].results) == 60
    return at_start.pop() if len(at_start) == 1 else -1, most


def test_cheap_tasks_fill_a_workers_credit_but_others_stop_at_two():
    # worker_credit is the pipelining depth: noop-cheap tasks fill it (a Bundle each way carries
    # several). Beyond two tasks only while they add up to cheap_queue_seconds (0.05 s) of measured
    # compute; before anything is measured, two.
    assert most_held(0.001, credit=8) == (2, 8)
    assert most_held(0.02, credit=8) == (2, 3)  # 2 x 0.02 <= 0.05: a third; 3 x 0.02 > 0.05: no fourth
    assert most_held(0.2, credit=8) == (2, 2)  # a real model's queue stays one task deep
    assert most_held(0.6, credit=8) == (2, 2)
    assert most_held(0.001, credit=1) == (1, 1)


def test_a_worker_slow_to_turn_its_tasks_around_gets_no_deep_queue():
    # Cheap measured tasks fill the credit while the worker answers at once; once its oldest task
    # has been out longer than cheap_queue_seconds (a worker starved of CPU), it is held to two.
    sim = deep_sim(0.001, credit=8, workers=1, inputs=100)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=1, start=True)["job_id"]
    node = next(iter(sim.workers))
    slot = sim.core.dispatcher.slots[node]
    w = sim.workers[node]
    assert len(slot.outstanding) == 2  # nothing measured yet
    first = w.received[0]
    sim.t += 0.001
    sim.deliver(node, TaskResult(first.task_id, job, node, 0.001, answers(first)))
    assert len(slot.outstanding) == 8  # measured, cheap, answered at once: the whole credit
    sim.t += 1.0  # the worker's next answer comes a second later
    second = w.received[1]
    sim.deliver(node, TaskResult(second.task_id, job, node, 0.001, answers(second)))
    assert len(slot.outstanding) == 7  # its oldest task has waited 1 s: no refill beyond two
    for task in [t for t in w.received if t.task_id in slot.outstanding][:5]:
        sim.deliver(node, TaskResult(task.task_id, job, node, 0.001, answers(task)))
    assert len(slot.outstanding) == 2
    # Answered at once again: the deep queue comes back.
    for task in [t for t in w.received if t.task_id in slot.outstanding]:
        sim.deliver(node, TaskResult(task.task_id, job, node, 0.001, answers(task)))
    assert len(slot.outstanding) == 8
