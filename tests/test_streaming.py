"""Results streamed piece by piece, slow start for new jobs, and the live query_rate a user samples.

Virtual-time tests over the in-memory transport (messages still serialized), with the model costs
measured on this machine's CPU (AlexNet ≈ 0.02 s, ResNet-50 ≈ 0.09 s per image on one thread).
"""

from __future__ import annotations

import statistics

import pytest
from simcluster import SimCluster

from broker.stats import rate_gap
from common.config import Config
from common.protocol import Task, TaskResult

ALEX, RESNET = "alexnet", "resnet50"
COSTS = {ALEX: 0.02, RESNET: 0.09}  # seconds per image on one thread, this machine idle


def _answers(task: Task, first: int, last: int) -> list[dict]:
    return [[q["index"], [["a", 0.5]], None] for q in task.queries[first:last]]


def _sampled_gaps(sim: SimCluster, jobs: list[str], start: float, step: float = 2.0) -> list[float]:
    """What a user sees: `query_rate` sampled every `step` s from `start` until the first job ends."""
    gaps = []
    sim.run_until(start)
    while all(sim.core.jobs.jobs[j].state == "running" for j in jobs):
        gaps.append(sim.command("query_rate")["gap"])
        sim.run_until(sim.t + step)
    return gaps


# Seconds per image on one thread: this machine idle, and with every core busy (the run:
# a ResNet-50 batch of 8 took ≈ 4 s). Inputs scale so both runs last about 85 s.
IDLE, LOADED = ({ALEX: 0.02, RESNET: 0.09}, 3000), ({ALEX: 0.1, RESNET: 0.5}, 600)


def _run_pair(costs: dict[str, float], inputs: int, cfg: Config | None = None, batch: int | str = 8,
              jitter: float = 0.0, seed: int = 0) -> list[float]:
    sim = SimCluster(costs, speeds=[1, 1, 1, 1], cfg=cfg, jitter=jitter, seed=seed)
    sim.add_inputs("in", inputs)
    jobs = [sim.command("submit", model=m, inputs="in/", batch=batch)["job_id"] for m in (ALEX, RESNET)]
    sim.command("start")
    return _sampled_gaps(sim, jobs, 15.0)


@pytest.mark.parametrize("costs,inputs", [IDLE, LOADED], ids=["idle", "loaded"])
def test_live_query_rate_gap_of_alexnet_and_resnet_stays_within_5_percent(costs, inputs):
    gaps = _run_pair(costs, inputs)
    assert len(gaps) >= 20, gaps  # the run is long enough to judge
    assert statistics.median(gaps) <= 0.05 and max(gaps) <= 0.10, [f"{g:.1%}" for g in gaps]


def test_whole_batches_bound_early_make_the_live_rate_swing():
    """The baseline, the old behaviour: results only at batch end and the prefetched batch bound to a
    job seconds before it runs. It reproduces what users saw (median ≈ 18 %, worst ≈ 35 %)."""
    old = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, stream_interval=0.0,
                 slow_start=False, prefetch_lead=1e9, task_seconds=0.0)
    gaps = _run_pair(*LOADED, cfg=old)
    assert statistics.median(gaps) > 0.10 and max(gaps) > 0.20, [f"{g:.1%}" for g in gaps]


# Before the task bound: tasks of the whole batch (a ResNet-50 batch of 8 is 4 s under load) and a
# prefetched task bound with 1 s of compute left.
UNBOUNDED = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, prefetch_lead=1.0,
                   task_seconds=0.0)


@pytest.mark.parametrize("batch", [8, "auto"])
def test_live_query_rate_stays_within_10_percent_when_compute_times_are_noisy(batch):
    """A loaded machine: each streamed piece's compute time varies (log-normal, sigma 0.1). Every
    sample, the worst one too, must stay within the issue's bound, run after run (3 seeds)."""
    worst = []
    for seed in range(3):
        gaps = _run_pair(*LOADED, batch=batch, jitter=0.1, seed=seed)
        assert len(gaps) >= 20 and statistics.median(gaps) <= 0.05, (seed, [f"{g:.1%}" for g in gaps])
        worst.append(max(gaps))
    assert max(worst) <= 0.10, [f"{g:.1%}" for g in worst]
    # Without the bound on a task's compute (and with the longer prefetch lead), the same runs
    # swing further: one task of 8 ResNet-50 images is 4 s of one worker's time, and the charge
    # between the jobs swings by a whole AlexNet batch of 8. (Worst samples 9.7-13.3 % against
    # 6.2-6.6 %; the windows' edges fading over the burst period hide part of that swing.)
    before = [max(_run_pair(*LOADED, cfg=UNBOUNDED, batch=batch, jitter=0.1, seed=seed)) for seed in range(3)]
    assert max(before) > 1.3 * max(worst), ([f"{g:.1%}" for g in before], [f"{g:.1%}" for g in worst])


def test_tasks_hold_about_a_second_of_compute_and_no_more_images_than_the_other_jobs_tasks():
    sim = SimCluster(LOADED[0], speeds=[1, 1, 1, 1])
    sim.add_inputs("in", 600)
    alex = sim.command("submit", model=ALEX, inputs="in/", batch=8)["job_id"]
    resnet = sim.command("submit", model=RESNET, inputs="in/", batch=8)["job_id"]
    sim.command("start")
    sim.run_until(20.0)
    sizes = {j: [n for t, job, _, n in sim.dispatches if job == j and t > 5.0] for j in (alex, resnet)}
    # ResNet-50 at 0.5 s per image: tasks of 2 images (1 s), not 8 (4 s); AlexNet's tasks match them.
    assert set(sizes[resnet]) == {2} and set(sizes[alex]) == {2}, sizes
    sim.command("cancel", job=resnet)
    mark = len(sim.dispatches)
    sim.run_until(30.0)
    # Alone, AlexNet's batch of 8 is 0.8 s of compute: whole batches again.
    assert {n for _, job, _, n in sim.dispatches[mark:] if job == alex} == {8}


def _task_sizes(cfg: Config | None = None, alex_weight: float = 1.0) -> dict[str, set[int]]:
    """Task sizes after the first 5 s of AlexNet + ResNet-50 (batch 8 each) at the loaded costs."""
    sim = SimCluster(LOADED[0], speeds=[1, 1, 1, 1], cfg=cfg)
    sim.add_inputs("in", 600)
    jobs = {ALEX: sim.command("submit", model=ALEX, inputs="in/", batch=8, weight=alex_weight)["job_id"],
            RESNET: sim.command("submit", model=RESNET, inputs="in/", batch=8)["job_id"]}
    sim.command("start")
    sim.run_until(20.0)
    return {m: {n for t, job, _, n in sim.dispatches if job == j and t > 5.0} for m, j in jobs.items()}


def test_a_heavier_job_gets_proportionally_larger_tasks_and_whole_batch_results_keep_whole_batches():
    assert _task_sizes(alex_weight=2.0) == {ALEX: {4}, RESNET: {2}}  # twice ResNet-50's tasks
    whole = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, stream_interval=0.0)
    assert _task_sizes(whole) == {ALEX: {8}, RESNET: {8}}  # the task is the compute batch: not cut


def test_a_new_job_gets_its_first_result_after_one_image_not_one_batch():
    sim = SimCluster(COSTS, speeds=[1, 1, 1, 1])
    sim.add_inputs("in", 2000)
    sim.command("submit", model=ALEX, inputs="in/", batch=8, start=True)
    sim.run_until(5.0)
    submitted = sim.t
    b = sim.command("submit", model=RESNET, inputs="in/", batch=8)["job_id"]
    sim.run_until(8.0)
    job = sim.core.jobs.jobs[b]
    sent = [(t, n) for t, j, _, n in sim.dispatches if j == b]
    # Slow start: one image a task until a result has measured ResNet-50's cost, then at most the
    # images sent so far (the batch doubles), up to the job's batch size.
    measured = job.stats.first_result
    before, after = [n for t, n in sent if t < measured], [n for t, n in sent if t >= measured]
    assert before and set(before) == {1}, sent[:8]
    total = len(before)
    for n in after:
        assert n <= max(1, total), sent[:12]
        total += n
    assert after[0] > 1 and set(after[-5:]) == {8}, sent[:12]
    # A slot frees within one streamed piece of AlexNet (≤ 0.25 s); then one ResNet image.
    assert job.stats.first_result - submitted <= 0.25 + COSTS[RESNET] + 1e-6


def _answered_by_hand(inputs: int) -> tuple[SimCluster, str, str, Task]:
    """One worker with one slot and a job of batch 8: (sim, job, worker, its first task), which the
    test answers itself (the simulated worker's own answers are dropped)."""
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=1, slow_start=False)
    sim = SimCluster({RESNET: 0.09}, speeds=[1], cfg=cfg)
    sim.add_inputs("in", inputs)
    job_id = sim.command("submit", model=RESNET, inputs="in/", batch=8, start=True)["job_id"]
    node = next(iter(sim.workers))
    task = sim.workers[node].received[0]
    sim.events.clear()
    return sim, job_id, node, task


def test_partial_results_count_at_once_keep_the_slot_and_the_final_piece_frees_it():
    sim, job_id, node, task = _answered_by_hand(16)
    sim.deliver(node, TaskResult(task.task_id, job_id, node, 0.18, _answers(task, 0, 2), final=False))
    acks = list(sim.acks)
    job = sim.core.jobs.jobs[job_id]
    assert len(job.results) == 2 and job.stats.latencies.count == 2
    assert [(a.task_id, a.final) for a in acks] == [(task.task_id, False)]  # the worker keeps its copy
    assert task.task_id in sim.core.jobs.tasks  # still out: the other 6 are computing
    assert sim.core.jobs.in_flight(job_id) == 6 and not job.pending.count(2)
    assert len(sim.workers[node].received) == 1  # its only slot is still taken: nothing more sent
    # The same piece again (a resend after a takeover) is a duplicate, counted once.
    sim.deliver(node, TaskResult(task.task_id, job_id, node, 0.18, _answers(task, 0, 2), final=False))
    assert len(job.results) == 2 and job.stats.duplicates == 2
    sim.deliver(node, TaskResult(task.task_id, job_id, node, 0.54, _answers(task, 2, 8), final=True))
    assert len(job.results) == 8 and task.task_id not in sim.core.jobs.tasks
    assert len(sim.workers[node].received) == 2  # the slot is free: the next batch went out
    assert sim.acks[-1].final is True
    # Each input has exactly one result.
    assert sorted(job.results) == list(range(8))


def test_a_final_piece_that_leaves_queries_unanswered_requeues_only_those():
    sim, job_id, node, task = _answered_by_hand(8)
    sim.deliver(node, TaskResult(task.task_id, job_id, node, 0.3, _answers(task, 0, 3), final=False))
    sim.deliver(node, TaskResult(task.task_id, job_id, node, 0.3, _answers(task, 3, 5), final=True))
    job = sim.core.jobs.jobs[job_id]
    out_again = sorted([*job.pending, *(i for t in sim.core.jobs.tasks.values() for i in t.indexes)])
    assert sorted(job.results) == [0, 1, 2, 3, 4] and out_again == [5, 6, 7]
    sim.run_until(10.0)
    assert job.state == "done" and sorted(job.results) == list(range(8))


def test_query_rate_of_a_young_job_is_over_its_age_and_a_30s_window_is_reported():
    sim = SimCluster({ALEX: 0.02}, speeds=[1])
    sim.add_inputs("in", 4000)
    job = sim.command("submit", model=ALEX, inputs="in/", batch=8, start=True)["job_id"]
    sim.run_until(3.0)
    r = sim.command("query_rate")["jobs"][job]
    # One worker at 0.02 s per image: ~50 images/s from the start, not 50 * 3/10.
    assert 40 <= r["rate"] <= 50 and 40 <= r["rate_long"] <= 50
    sim.run_until(60.0)
    out = sim.command("query_rate")
    r = out["jobs"][job]
    assert r["window"] == 10.0 and r["window_long"] == 30.0
    assert abs(r["rate"] - 50) <= 2 and abs(r["rate_long"] - 50) <= 2
    assert out["gap"] == 0.0 and out["gap_long"] == 0.0 == rate_gap([r["rate"]])


def test_batch_auto_sizes_batches_from_each_workers_measured_cost():
    sim = SimCluster({RESNET: 0.09}, speeds=[1.0, 0.5])  # the second worker is half as fast
    sim.add_inputs("in", 1000)
    job = sim.command("submit", model=RESNET, inputs="in/", batch="auto", latency_target=0.9, start=True)
    assert job["batch_size"] == "auto" and job["latency_target"] == 0.9
    sim.run_until(20.0)
    fast, slow = sim.workers
    sizes = {w: [n for _, _, node, n in sim.dispatches if node == w] for w in (fast, slow)}
    # Measured 0.09 s per image on the fast worker -> 10 images in 0.9 s; 0.18 s on the slow one -> 5.
    assert sizes[fast][-3:] == [10, 10, 10] and sizes[slow][-3:] == [5, 5, 5], sizes
    sim.command("set_batch_size", job=job["job_id"], n=4)
    mark = len(sim.dispatches)
    sim.run_until(25.0)
    assert {n for _, _, _, n in sim.dispatches[mark:]} == {4}
    sim.command("set_batch_size", job=job["job_id"], n="auto", latency_target=0.36)
    mark = len(sim.dispatches)
    sim.run_until(30.0)
    assert {n for _, _, node, n in sim.dispatches[mark:] if node == fast} == {4}
    assert sim.core.jobs.jobs[job["job_id"]].pending  # every size above came from the rule, not the tail


def test_auto_batch_with_live_rates_stays_fair():
    sim = SimCluster(LOADED[0], speeds=[1, 1, 1, 1])
    sim.add_inputs("in", LOADED[1])
    jobs = [sim.command("submit", model=m, inputs="in/", batch="auto")["job_id"] for m in (ALEX, RESNET)]
    sim.command("start")
    gaps = _sampled_gaps(sim, jobs, 15.0)
    assert len(gaps) >= 20 and statistics.median(gaps) <= 0.05 and max(gaps) <= 0.10, [f"{g:.1%}" for g in gaps]


def test_latency_target_without_auto_and_bad_batch_words_are_refused():
    sim = SimCluster({RESNET: 0.09}, speeds=[1])
    sim.add_inputs("in", 4)
    for args, word in (({"batch": 8, "latency_target": 1.0}, "goes with --batch auto"),
                       ({"batch": "big"}, "integer or auto"), ({"batch": "auto", "latency_target": 0}, "at least")):
        with pytest.raises(RuntimeError, match=word):
            sim.command("submit", model=RESNET, inputs="in/", **args)
    assert not sim.core.jobs.jobs



def test_rate_windows_end_one_long_piece_ago_capped_and_only_while_jobs_run():
    sim = SimCluster({ALEX: 0.02, "dear": 0.7, "huge": 5.0}, speeds=[1, 1, 1, 1])
    sim.add_inputs("in", 200)
    jobs = [sim.command("submit", model=m, inputs="in/", batch=2)["job_id"] for m in (ALEX, "dear")]
    sim.command("start")
    sim.run_until(20.0)
    out = sim.command("query_rate")
    assert [r["lag"] for r in out["jobs"].values()] == [pytest.approx(0.7)] * 2  # dear's one-image pieces
    # Four workers serve both jobs, so neither comes in bursts: the edges fade over the lag.
    assert [r["ramp"] for r in out["jobs"].values()] == [pytest.approx(0.7)] * 2
    sim.run_until(400.0)
    assert all(sim.core.jobs.jobs[j].state == "done" for j in jobs)
    assert {r["lag"] for r in sim.command("query_rate")["jobs"].values()} == {0.0}  # nothing runs
    huge = sim.command("submit", model="huge", inputs="in/", batch=1, start=True)["job_id"]
    sim.run_until(430.0)
    out = sim.command("query_rate", job=huge)["jobs"][huge]
    assert out["lag"] == out["ramp"] == 2.5  # a quarter of the 10 s window
