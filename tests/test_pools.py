"""Model-specific worker pools (broker/pools.py): the planner alone, then in the simulated cluster.

The sim tests run over the in-memory transport in virtual time (tests/simcluster.py) with per-model
costs; fairness is judged as in tests/test_streaming.py, on the live `query_rate` a user samples.
"""

from __future__ import annotations

import random
import statistics

from simcluster import SimCluster

from broker.pools import Demand, PoolPlanner, apportion, plan
from common.config import Config
from common.protocol import Bundle, Heartbeat, Preload, Ready, Task


def _workers(n: int, budget: int) -> dict[str, int]:
    return {f"w{i}": budget for i in range(n)}


def test_apportion_gives_every_model_a_worker_and_the_rest_by_demand() -> None:
    assert apportion(4, {"a": 3.5, "b": 1.0}) == {"a": 3, "b": 1}
    assert apportion(4, {"a": 100.0, "b": 1.0, "c": 1.0}) == {"a": 2, "b": 1, "c": 1}
    assert sum(apportion(3, {f"m{i}": 1.0 for i in range(6)}).values()) == 3  # more models than workers


def test_a_fractional_ideal_gets_a_swing_worker_serving_both_models() -> None:
    # Ideal 3.11 : 0.89 workers: A's three whole workers fall short, so B's worker serves A too.
    pools = plan(_workers(4, 1 << 20), {"a": 3.5, "b": 1.0}, {}, {})
    assert all(p == {"a", "b"} for p in pools.values())  # no memory bound: every worker may serve both
    tight = plan(_workers(4, 2), {"a": 3.5, "b": 1.0}, {}, {})
    assert any(p == {"a", "b"} for p in tight.values()), tight


def test_six_models_on_six_workers_with_two_each_all_served_within_budget() -> None:
    work = {f"m{i}": float(1 + i) for i in range(6)}
    pools = plan(_workers(6, 2), work, {}, {})
    assert all(len(p) <= 2 for p in pools.values()), pools
    assert all(any(m in p for p in pools.values()) for m in work), pools
    one = plan(_workers(3, 2), {f"m{i}": 1.0 for i in range(6)}, {}, {})  # exactly full
    assert sorted(m for p in one.values() for m in p) == sorted(f"m{i}" for i in range(6))


def test_a_worker_keeps_its_loaded_model_when_the_plan_allows() -> None:
    pools = plan(_workers(2, 1), {"a": 1.0, "b": 1.0}, {"w0": frozenset({"b"}), "w1": frozenset({"a"})}, {})
    assert pools == {"w0": {"b"}, "w1": {"a"}}


def test_planner_moves_one_worker_per_model_per_interval_and_only_when_worth_a_load() -> None:
    p = PoolPlanner(replan_interval=5.0, load_time=5.0)
    w = _workers(4, 1)
    a_only = {"a": Demand("a", 1.0, 100.0)}
    p.update(w, {}, a_only, "s1", 0.0)
    assert all(pool == {"a"} for pool in p.pools.values())
    both = a_only | {"b": Demand("b", 1.0, 100.0)}
    changes = p.update(w, {}, both, "s2", 1.0)
    assert len(changes) == 1 and sum("b" in x for x in p.pools.values()) == 1  # one worker left a
    p.update(w, {}, both, "s2", 2.0)  # same demand, inside the interval: nothing moves
    assert sum("b" in x for x in p.pools.values()) == 1
    p.update(w, {}, both, "s2", 6.5)  # the interval elapsed: the second move
    assert sum("b" in x for x in p.pools.values()) == 2
    # A model with almost no backlog left is not worth a load: the worker stays where it is.
    q = PoolPlanner(replan_interval=5.0, load_time=5.0)
    q.update(w, {}, a_only, "s1", 0.0)
    q.update(w, {}, a_only | {"b": Demand("b", 1.0, 0.5)}, "s2", 1.0)
    assert sum("b" in x for x in q.pools.values()) == 1  # its one worker (every model gets one), no more


def test_a_move_is_not_undone_within_an_interval_when_the_demand_swings_back() -> None:
    """Two cost measurements 0.2 s apart once moved a worker off vgg16 and back onto it: two loads
    of a 528 MB model for nothing. A model whose pool a move changed keeps its workers for an
    interval, whichever way the move went; once it elapsed, the plan is followed again."""
    p = PoolPlanner(replan_interval=5.0, load_time=0.0)
    w = _workers(4, 1)
    a_heavy = {"a": Demand("a", 3.0, 100.0), "b": Demand("b", 1.0, 100.0)}
    b_heavy = {"a": Demand("a", 1.0, 100.0), "b": Demand("b", 3.0, 100.0)}
    p.update(w, {}, a_heavy, "s1", 0.0)
    assert sorted(sum(m in x for x in p.pools.values()) for m in "ab") == [1, 3]
    moves = []
    for t, demand, sig in ((10.0, b_heavy, "s2"), (10.2, a_heavy, "s3"), (10.4, b_heavy, "s4"), (10.6, a_heavy, "s5")):
        moves += [(t, ch.worker) for ch in p.update(w, {}, demand, sig, t) if ch.removed]
    assert [t for t, _ in moves] == [10.0], moves  # one worker left a for b; nothing undid it
    assert sum("b" in x for x in p.pools.values()) == 2
    back = p.update(w, {}, a_heavy, "s6", 15.1)  # the interval elapsed: the plan is followed again
    assert len(back) == 1 and sum("a" in x for x in p.pools.values()) == 3


def test_random_demand_and_shrinking_budgets_never_strand_a_served_model_or_overfill_a_pool() -> None:
    """Replans with random demand (models coming, going, starting), budgets that shrink and grow
    (the sizes workers report) and random loaded models: a running model that had a worker keeps
    one, and a pool is within its budget unless its worker is the last of more running models than
    that (queued ones may lose their last worker: the next plan gives them one).
    (A pool over its budget once dropped a model whose new worker's move was on hold: no worker
    served it until the next replan.)"""
    rng = random.Random(5)
    stranded, overfull = [], []
    for run in range(300):
        p = PoolPlanner(replan_interval=5.0, load_time=rng.choice((0.0, 5.0)))
        names = [f"w{i}" for i in range(rng.randint(1, 5))]
        now = 0.0
        for step in range(12):
            now += rng.choice((0.2, 1.0, 6.0))
            models = rng.sample("abcdef", rng.randint(1, 6))
            demand = {m: Demand(m, rng.uniform(0.1, 3.0), rng.uniform(0.0, 100.0), rng.random() < 0.8)
                      for m in models}
            budget = {w: rng.randint(1, 3) for w in names}
            loaded = {w: frozenset(rng.sample(models, min(len(models), rng.randint(0, 2)))) for w in names}
            before = {m for m in demand if demand[m].running and any(m in p.of(w) for w in names)}
            p.update(budget, loaded, demand, (run, step), now)
            stranded += [(run, step, m) for m in before if not any(m in p.of(w) for w in names)]
            for w in names:
                alone = {m for m in p.of(w) if sum(m in p.of(v) for v in names) == 1 and demand[m].running}
                if len(p.of(w)) > max(budget[w], len(alone)):
                    overfull.append((run, step, w, sorted(p.of(w)), budget[w]))
    assert not stranded, stranded[:5]
    assert not overfull, overfull[:5]


def test_queued_models_move_freely_and_a_model_without_demand_leaves_the_pools() -> None:
    p = PoolPlanner(replan_interval=5.0, load_time=0.0)
    w = _workers(4, 1)
    p.update(w, {}, {"a": Demand("a", 1.0, 100.0, running=False)}, "s1", 0.0)
    p.update(w, {}, {"a": Demand("a", 1.0, 100.0, running=False), "b": Demand("b", 1.0, 100.0)}, "s2", 0.1)
    assert sorted(len([x for x in p.pools.values() if m in x]) for m in "ab") == [2, 2]  # no interval wait
    p.update(w, {}, {"b": Demand("b", 1.0, 100.0)}, "s3", 0.2)
    assert all("a" not in x for x in p.pools.values())


# ---------------------------------------------------------------------------------------------
# simulated cluster

def _gaps(sim: SimCluster, jobs: list[str], start: float, step: float = 2.0, check=None) -> list[float]:
    gaps = []
    sim.run_until(start)
    while all(sim.core.jobs.jobs[j].state == "running" for j in jobs):
        gaps.append(sim.command("query_rate")["gap"])
        if check is not None:
            check()
        sim.run_until(sim.t + step)
    return gaps


def test_two_models_35x_cost_ratio_on_four_workers_with_one_spare_model_each_rates_equal() -> None:
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, pool_max_models=2)
    sim = SimCluster({"cheap": 0.02, "dear": 0.07}, speeds=[1, 1, 1, 1], cfg=cfg)
    sim.add_inputs("in", 3000)
    jobs = [sim.command("submit", model=m, inputs="in/", batch=8)["job_id"] for m in ("cheap", "dear")]
    sim.command("start")
    gaps = _gaps(sim, jobs, 15.0)
    assert len(gaps) >= 15, gaps
    assert statistics.median(gaps) <= 0.05, [f"{g:.1%}" for g in gaps]


def _six_models(budget: int, check: bool) -> tuple[SimCluster, list[str], list[float]]:
    costs = {f"m{i}": c for i, c in enumerate((0.02, 0.03, 0.05, 0.07, 0.09, 0.12))}
    # prefetch_lead 1 s, as when this bound was set: the 0.5 s default (issue 14's live rates) brings
    # the unpooled baseline's median from 9.4 % to 4.8 % but the pooled one only from 9.5 % to 8.5 %.
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, pool_max_models=budget,
                 prefetch_lead=1.0)
    sim = SimCluster(costs, speeds=[1] * 6, cfg=cfg)
    sim.add_inputs("in", 2000)
    jobs = [sim.command("submit", model=m, inputs="in/", batch=8)["job_id"] for m in costs]
    sim.command("start")
    pools = sim.core.dispatcher.pools

    def within_budget() -> None:
        assert all(len(pools.of(w)) <= budget for w in sim.workers), {w: pools.of(w) for w in sim.workers}

    return sim, jobs, _gaps(sim, jobs, 15.0, check=within_budget if check else None)


def test_six_models_on_six_workers_two_per_pool_all_progress_fairly() -> None:
    """Six jobs' max-min gap is wider than two jobs' even with every worker serving every model
    (the baseline, measured in the same test); two-model pools stay within 3 points of it."""
    sim, jobs, gaps = _six_models(2, check=True)
    _, _, baseline = _six_models(0, check=False)
    assert len(gaps) >= 10, gaps
    assert statistics.median(gaps) <= max(0.05, statistics.median(baseline) + 0.03), (
        [f"{g:.1%}" for g in gaps], f"baseline {statistics.median(baseline):.1%}")
    assert all(sim.core.jobs.jobs[j].completed > 0 for j in jobs)
    assert any(e["kind"] == "pool" for e in sim.core.state.events)  # pool changes are on the timeline


def test_a_jobs_first_batch_goes_to_a_worker_that_has_its_model_loaded() -> None:
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2)
    sim = SimCluster({"a": 0.05}, speeds=[1, 1, 1, 1], cfg=cfg)
    warm = "127.0.0.1:9003@1"
    sim.deliver(warm, Ready(warm, cfg.worker_credit, ["a"]))
    sim.add_inputs("in", 50)
    job = sim.command("submit", model="a", inputs="in/", batch=8, start=True)["job_id"]
    first = next(d for d in sim.dispatches if d[1] == job)
    assert first[2] == warm, sim.dispatches[:3]


def test_submit_preloads_only_the_pool_of_the_model_when_pools_are_bounded() -> None:
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, pool_max_models=1)
    sim = SimCluster({"a": 0.05, "b": 0.05}, speeds=[1, 1, 1, 1], cfg=cfg)
    sent: list[tuple[str, object]] = []
    send = sim.net.send

    def record(identity: bytes, msg) -> bool:
        # A Bundle's parts one by one: Tasks of a dispatch pass go out in one Bundle.
        sent.extend((identity.decode(), m) for m in (msg.messages if isinstance(msg, Bundle) else [msg]))
        return send(identity, msg)

    sim.net.send = record
    sim.add_inputs("in", 2000)
    sim.command("submit", model="a", inputs="in/")
    sim.command("submit", model="b", inputs="in/")
    pre = {(n, m.model) for n, m in sent if isinstance(m, Preload)}
    pools = sim.core.dispatcher.pools
    assert {w for w in sim.workers if "b" in pools.of(w)} == {n for n, m in pre if m == "b"}
    assert sum("b" in pools.of(w) for w in sim.workers) == 2  # half the workers: equal demand
    sim.command("start")
    sim.run_until(10.0)  # both jobs keep a backlog: no worker falls back to the other pool
    tasks = [(n, m) for n, m in sent if isinstance(m, Task)]
    assert tasks and all(m.model in pools.of(n) for n, m in tasks)


def test_jobs_show_loading_until_a_worker_reports_the_model_and_vm_info_shows_pools() -> None:
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, pool_max_models=1)
    sim = SimCluster({"a": 0.05, "b": 0.05}, speeds=[1, 1], cfg=cfg)
    sim.add_inputs("in", 20)
    job = sim.command("submit", model="a", inputs="in/")["job_id"]
    assert [j["loading"] for j in sim.command("jobs")] == [True]
    worker = "127.0.0.1:9001@1"
    sim.deliver(worker, Ready(worker, cfg.worker_credit, ["a"]))
    assert [j["loading"] for j in sim.command("jobs") if j["job_id"] == job] == [False]
    sim.command("submit", model="b", inputs="in/")
    info = sim.command("vm_info")
    assert sorted(tuple(d["pool"]) for d in info.values()) == [("a",), ("b",)]
    assert info[worker]["pool"] == ["a"]  # the worker that has a loaded keeps it


def test_top_shows_pool_changes_and_loading_jobs() -> None:
    from rich.console import Console

    from cli import top

    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, pool_max_models=1)
    sim = SimCluster({"a": 0.05, "b": 0.05}, speeds=[1, 1], cfg=cfg)
    sim.add_inputs("in", 20)
    sim.command("submit", model="a", inputs="in/")
    sim.command("submit", model="b", inputs="in/")
    console = Console(record=True, width=200)
    console.print(top.view(sim.command("status")))
    text = console.export_text()
    assert "pool changes" in text and "+b -a" in text, text
    assert "queued (loading)" in text


def test_without_pool_max_models_a_pool_holds_what_fits_the_budget_workers_report() -> None:
    """pool_max_models = 0: before any size is known nothing bounds a pool; once workers report a
    250 MB budget and 100 MB models, no pool holds more than two of the three, and all are served."""
    costs = {"a": 0.05, "b": 0.05, "c": 0.05}
    cfg = Config(heartbeat_interval=1.0, task_timeout_min=1e6, worker_credit=2, pool_max_models=0)
    sim = SimCluster(costs, speeds=[1, 1, 1, 1], cfg=cfg, budget_mb=250, model_mb=dict.fromkeys(costs, 100))
    sim.add_inputs("in", 2000)
    for m in costs:
        sim.command("submit", model=m, inputs="in/", batch=4)
    pools = sim.core.dispatcher.pools
    assert all(len(pools.of(w)) == 3 for w in sim.workers)  # no size known yet: unbounded
    sim.command("start")
    sim.run_until(10.0)  # tasks ran (the jobs still have work), heartbeats carried the sizes, the pools were replanned
    assert sim.core.dispatcher.model_mb == dict.fromkeys(costs, 100)
    assert all(len(pools.of(w)) <= 2 for w in sim.workers), {w: pools.of(w) for w in sim.workers}
    assert all(any(m in pools.of(w) for w in sim.workers) for m in costs)
    info = sim.command("vm_info")
    assert all(d["budget_mb"] == 250 and d["rss_mb"] > 100 for d in info.values()), info
    assert all(set(d["model_mb"]) == set(d["models"]) for d in info.values()), info
    # A worker's pool bound comes from its own budget, unknown models sized at the known mean.
    assert pools.capacity("127.0.0.1:9000@1", ["a", "new"]) == 2
    assert pools.capacity("nobody", ["a"]) > 1000  # no report from it: no bound


def test_six_models_of_very_different_cost_on_four_workers_two_per_pool_rates_stay_equal() -> None:
    """The bench/pools.py case in the sim: vgg-like 0.8 s per image beside five models of 0.04 to
    0.12 s, 4 workers, 2 models each. No plan within the budget lets the expensive model's workers
    carry all the cheap ones: one worker holds two cheap models only. Unpaced, its jobs ran 4x as
    fast as the rest (75 % median gap); paced, each cheap model has one worker, which it shares with
    vgg's 0.8 s images, so it is served in bursts between them: a square 10 s window read 6.7 %
    (the baseline 2.3 %) as its edges crossed the bursts; with edges faded over one long piece
    (JobStats.rate's ramp), 3.5 % (the baseline 0.3 %): issue #15's 5 %; over the burst period
    when it is longer (query_rate's ramp), 3.2 %."""
    def run(budget: int) -> list[float]:
        costs = {"alex": 0.05, "res18": 0.12, "mobile": 0.04, "squeeze": 0.06, "shuffle": 0.05, "vgg": 0.8}
        cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, pool_max_models=budget)
        sim = SimCluster(costs, speeds=[1] * 4, cfg=cfg)
        sim.add_inputs("in", 600)
        jobs = [sim.command("submit", model=m, inputs="in/", batch=2)["job_id"] for m in costs]
        sim.command("start")
        pools = sim.core.dispatcher.pools
        gaps, fades = [], []
        sim.run_until(15.0)  # warm-up: the costs are measured, the pools planned on them
        while sim.t < 120.0 and all(sim.core.jobs.jobs[j].state == "running" for j in jobs):
            out = sim.command("query_rate")
            gaps.append(out["gap"])
            fades.append(next((r["ramp"] / r["lag"] for r in out["jobs"].values() if r["lag"] > 0), 1.0))
            assert all(len(pools.of(w)) <= (budget or 6) for w in sim.workers)
            sim.run_until(sim.t + 2.0)
        assert len(gaps) >= 40, len(gaps)  # every job still ran at 120 s: the gaps are among all six
        return gaps, fades

    (pooled, fades), (baseline, _) = run(2), run(0)
    pooled, baseline = statistics.median(pooled), statistics.median(baseline)
    assert pooled <= 0.05 and baseline <= 0.05, f"pools {pooled:.1%}, baseline {baseline:.1%}"
    # With pools, the edges fade over the cheap jobs' burst period (about 1.1 s), not one vgg image.
    assert statistics.median(fades) > 1.2, fades


def test_a_job_ahead_of_the_least_served_waits_rather_than_widen_the_gap() -> None:
    """Pacing, on its own: two workers, one model each (pools of 1), one model 40x as dear as the
    other: the cheap job's worker would finish 40x as many images; it waits for the dear one."""
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, pool_max_models=1)
    sim = SimCluster({"cheap": 0.01, "dear": 0.4}, speeds=[1, 1], cfg=cfg)
    sim.add_inputs("in", 3000)
    jobs = {m: sim.command("submit", model=m, inputs="in/", batch=2)["job_id"] for m in ("cheap", "dear")}
    sim.command("start")
    sim.run_until(60.0)
    done = {m: sim.core.jobs.jobs[j].completed for m, j in jobs.items()}
    # Within the dear job's images in flight (2 tasks of 2) and half a batch of lead.
    assert done["dear"] > 100 and abs(done["cheap"] - done["dear"]) <= 6, done


def test_workers_reporting_different_sizes_of_a_model_do_not_replan_every_heartbeat() -> None:
    """One worker holds two checkpoints of a (it reports their sum), the other one: a's size is the
    larger figure, kept while both report, so the pools are planned once, not on every heartbeat."""
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, pool_replan_interval=1e6)
    sim = SimCluster({"a": 0.05, "b": 0.05}, speeds=[1, 1], cfg=cfg, budget_mb=250)
    sim.add_inputs("in", 100)
    sim.command("submit", model="a", inputs="in/")
    sim.command("submit", model="b", inputs="in/")
    keeper = sim.core.dispatcher.pools
    plans: list[float] = []
    update = keeper.planner.update

    def counted(*args, **kwargs):
        plans.append(sim.t)
        return update(*args, **kwargs)

    keeper.planner.update = counted
    w0, w1 = sim.workers

    def beats(a0: int) -> None:
        for _ in range(10):
            sim.deliver(w0, Heartbeat(w0, 0, ["a"], rss_mb=300, budget_mb=250, model_mb={"a": a0}))
            keeper.refresh(sim.t)
            sim.deliver(w1, Heartbeat(w1, 0, ["a", "b"], rss_mb=300, budget_mb=250, model_mb={"a": 100, "b": 90}))
            keeper.refresh(sim.t)

    beats(200)
    assert sim.core.dispatcher.model_mb == {"a": 200, "b": 90}
    assert len(plans) <= 2, plans  # the sizes learnt (a from w0, b from w1), then no change
    plans.clear()
    beats(200)
    assert plans == []
    beats(300)  # a really grew: one replan
    assert len(plans) == 1 and sim.core.dispatcher.model_mb["a"] == 300
    plans.clear()
    beats(100)  # w0 dropped its second checkpoint: a is as large as the workers report now
    assert len(plans) == 1 and sim.core.dispatcher.model_mb["a"] == 100


def test_a_pinned_checkpoint_is_preloaded_once_per_worker_of_the_pool() -> None:
    """A job pinned to a checkpoint: each worker of its model's pool gets one Preload of it, whether
    the submit put the worker in the pool (the replan preloads it) or it was there already."""
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=2, pool_max_models=1)
    sim = SimCluster({"a": 0.05, "b": 0.05}, speeds=[1, 1], cfg=cfg)  # a pool each, whatever the demand
    sent: list[tuple[str, Preload]] = []
    send = sim.net.send

    def record(identity: bytes, msg) -> bool:
        if isinstance(msg, Preload):
            sent.append((identity.decode(), msg))
        return send(identity, msg)

    sim.net.send = record
    files = [[f"in/img{i:05d}.jpg", 1, 100, "c" * 64] for i in range(100)]
    files += [["models/a.pth", 1, 100, "d" * 64], ["models/a2.pth", 1, 100, "e" * 64]]
    for node in sim.workers:
        sim.core.master.node_report(node, files)
    sim.command("submit", model="b", inputs="in/")
    sim.command("submit", model="a", inputs="in/", weights="models/a.pth")  # new pool members for a
    pool = {w for w in sim.workers if "a" in sim.core.dispatcher.pools.of(w)}
    pinned = [n for n, m in sent if (m.model, m.weights) == ("a", "models/a.pth")]
    assert pool and sorted(pinned) == sorted(pool), (pinned, pool)  # once each (it was twice)
    sent.clear()
    sim.command("submit", model="a", inputs="in/", weights="models/a2.pth")  # the pool stays
    assert {w for w in sim.workers if "a" in sim.core.dispatcher.pools.of(w)} == pool
    assert sorted(n for n, m in sent) == sorted(pool) and all(m.weights == "models/a2.pth" for _, m in sent), sent
