"""Coordinator logic over the in-memory transport (serialized messages, virtual time)."""

from __future__ import annotations

import pytest
from simcluster import WHOLE_BATCHES, SimCluster, state_updates

from broker.coordinator import STANDBY, Coordinator
from broker.stats import rate_gap
from common.commands import COMMANDS
from common.config import Config
from common.protocol import Bundle, Error, Heartbeat, Leave, Rejoin, ResultAck, Task, TaskResult, Topic, decode

CHEAP, DEAR = "cheap", "dear"


def window_gap(sim: SimCluster, jobs: list[str], t0: float, t1: float, window: float = 10.0) -> float:
    gaps = []
    t = t0
    while t + window <= t1:
        gaps.append(rate_gap([sim.rate(j, t, t + window) for j in jobs]))
        t += 1.0
    return max(gaps)


def test_two_models_of_very_different_cost_converge_to_equal_rates_and_new_job_starts_at_once():
    sim = SimCluster({CHEAP: 0.01, DEAR: 0.10}, speeds=[1, 1, 1, 1])
    sim.add_inputs("in", 10_000)
    a = sim.command("submit", model=CHEAP, inputs="in/", batch=8, start=True)["job_id"]
    sim.run_until(5.0)
    submitted = sim.t
    b = sim.command("submit", model=DEAR, inputs="in/", batch=8)["job_id"]
    assert sim.core.jobs.jobs[b].state == "running"  # joins the running job without `start`
    sim.run_until(6.0)
    first_b = min(t for t, job, _, _ in sim.dispatches if job == b)
    # "Immediately": the first slot that frees after submit goes to the new job (a cheap batch is 0.08 s).
    assert first_b - submitted <= 0.08 + 1e-9
    sim.run_until(60.0)
    gap = window_gap(sim, [a, b], 15.0, 60.0)
    assert gap <= 0.10, f"rate gap {gap:.1%}"
    # The expensive model got about 10x the worker time: that is what equal rates cost.
    busy = {a: 0.0, b: 0.0}
    for t, job, _, n in sim.dispatches:
        if t >= 15:
            busy[job] += n * (0.01 if job == a else 0.10)
    assert 7 <= busy[b] / busy[a] <= 13


def test_unequal_workers_and_three_jobs_stay_fair():
    sim = SimCluster({"m1": 0.01, "m2": 0.04, "m3": 0.12}, speeds=[1.0, 0.5, 2.0, 1.0])
    sim.add_inputs("in", 10_000)
    jobs = [sim.command("submit", model=m, inputs="in/", batch=4, start=True)["job_id"]
            for m in ("m1", "m2", "m3")]
    sim.run_until(60.0)
    assert window_gap(sim, jobs, 15.0, 60.0) <= 0.10
    # No worker idles while work is pending: every worker finished batches until the end.
    for node in sim.workers:
        assert max(t for t, _, w, _ in sim.dispatches if w == node) > 59.0


def test_weight_gives_a_proportional_share():
    sim = SimCluster({CHEAP: 0.02, DEAR: 0.05}, speeds=[1, 1, 1])
    sim.add_inputs("in", 10_000)
    a = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True, weight=2.0)["job_id"]
    b = sim.command("submit", model=DEAR, inputs="in/", batch=4)["job_id"]
    sim.run_until(40.0)
    ratio = sim.rate(a, 10, 40) / sim.rate(b, 10, 40)
    assert ratio == pytest.approx(2.0, rel=0.10)


def test_worker_failure_requeues_and_every_input_gets_exactly_one_result():
    cfg = Config(heartbeat_interval=0.5, liveness=3, task_timeout_min=1e6)
    sim = SimCluster({CHEAP: 0.05}, speeds=[1, 1, 1], cfg=cfg)
    sim.add_inputs("in", 200)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    sim.run_until(2.0)
    victim = next(iter(sim.workers))
    held = [t.task_id for t in sim.core.jobs.tasks_of(victim)]
    assert held, "the victim should hold work when it dies"
    sim.kill(victim)
    sim.run_until(60.0)
    j = sim.core.jobs.jobs[job]
    assert j.state == "done"
    assert sorted(j.results) == list(range(200))
    assert not sim.core.registry.is_alive(victim)
    # A late result from the dead worker is acknowledged but dropped.
    late = TaskResult(held[0], job, victim, 0.1, [[0, [["late", 1.0]], None]])
    sim.deliver(victim, late)
    assert j.results[0]["top5"] != [["late", 1.0]]
    # ...and its heartbeat is answered with Rejoin (a new incarnation must join).
    sim.core.handle(victim.encode(), decode(Heartbeat(victim).encode()), sim.t)
    assert any(isinstance(decode(b), Rejoin) for i, b in sim.net.outbox if i == victim.encode())


def test_a_worker_failure_does_not_cost_the_job_it_was_serving_its_share():
    """Queries lost with a worker are re-run without being charged twice to their job."""
    cfg = Config(heartbeat_interval=0.5, liveness=3, task_timeout_min=1e6)
    sim = SimCluster({CHEAP: 0.05, "cheap2": 0.05}, speeds=[1, 1, 1, 1], cfg=cfg)
    sim.add_inputs("in", 400)
    a = sim.command("submit", model=CHEAP, inputs="in/", batch=8)["job_id"]
    b = sim.command("submit", model="cheap2", inputs="in/", batch=8)["job_id"]
    sim.command("start")
    sim.run_until(3.0)
    victims = [w for w in sim.workers
               if sim.core.jobs.tasks_of(w) and all(t.job_id == a for t in sim.core.jobs.tasks_of(w))]
    assert sum(len(t.indexes) for v in victims for t in sim.core.jobs.tasks_of(v)) >= 16
    for v in victims:
        sim.kill(v)
    sim.run_until(12.0)
    done_a, done_b = (sim.core.jobs.jobs[j].stats.images_between(0, 12) for j in (a, b))
    assert done_a == pytest.approx(done_b, abs=8)  # charged twice, job a would trail by all it lost


def test_duplicate_results_are_counted_once():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1], cfg=WHOLE_BATCHES)
    sim.add_inputs("in", 8)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=8, start=True)["job_id"]
    node = next(iter(sim.workers))
    task = sim.workers[node].received[0]
    answers = [[q["index"], [["a", 0.5]], None] for q in task.queries]
    res = TaskResult(task.task_id, job, node, 0.1, answers)
    sim.deliver(res.node_id, res)
    sim.deliver(res.node_id, res)
    j = sim.core.jobs.jobs[job]
    assert len(j.results) == 8 and j.stats.latencies.count == 8 and j.state == "done"


def test_set_batch_size_takes_effect_live():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1, 1], cfg=WHOLE_BATCHES)
    sim.add_inputs("in", 1000)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=8, start=True)["job_id"]
    sim.run_until(1.0)
    assert {n for _, _, _, n in sim.dispatches} == {8}
    sim.command("set_batch_size", job=job, n=3)
    mark = len(sim.dispatches)
    sim.run_until(3.0)
    later = [n for _, _, _, n in sim.dispatches[mark:]]
    assert later and set(later) == {3}


def test_submit_refuses_missing_inputs_and_bad_arguments():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1])
    sim.add_inputs("in", 3)
    with pytest.raises(RuntimeError, match="no input files match"):
        sim.command("submit", model=CHEAP, inputs="nothing/")
    with pytest.raises(RuntimeError, match="batch size"):
        sim.command("submit", model=CHEAP, inputs="in/", batch=100_000)
    with pytest.raises(RuntimeError, match="no such job"):
        sim.command("query_rate", job="job99")
    with pytest.raises(RuntimeError, match="unknown command"):
        sim.command("format_disk")
    job = sim.command("submit", model=CHEAP, inputs="in/")["job_id"]
    with pytest.raises(RuntimeError, match="bad arguments"):
        sim.command("set_batch_size", job=job)
    with pytest.raises(RuntimeError, match="bad arguments"):
        sim.command("set_batch_size", job=job, n="many")


def test_every_command_has_a_handler_and_answers():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1, 1])
    sim.add_inputs("in", 20)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4)["job_id"]
    assert sim.command("pending")[job]["pending_count"] == 20  # queued until `start`
    assert sim.command("start")["started"] == [job]
    sim.run_until(5.0)
    args = {"query_rate": {"job": job}, "query_time": {"job": job}, "results": {"job": job},
            "set_batch_size": {"job": job, "n": 2}, "submit": {"model": CHEAP, "inputs": "in/"},
            "cancel": {"job": job}}
    for name in COMMANDS:
        data = sim.command(name, **args.get(name, {}))
        assert data is not None, name
    assert sim.command("completed")[job]["completed"] == 20
    assert len(sim.command("results", job=job)["results"]) == 20
    t = sim.command("query_time", job=job)[job]["latency"]
    assert t["count"] == 20 and t["median"] <= t["p90"] <= t["p95"] <= t["p99"]


def test_leave_is_not_a_failure():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1, 1])
    node = next(iter(sim.workers))
    sim.deliver(node, Leave(node))
    events = [decode(b) for topic, b in sim.net.published if topic == Topic.VIEW]
    assert [e.event for e in events][-1] == "leave"
    assert sim.core.registry.get(node).state == "left"


def test_standby_replays_the_primarys_state_and_takes_over_without_losing_or_duplicating():
    sim = SimCluster({CHEAP: 0.02, DEAR: 0.05}, speeds=[1, 1, 1])
    standby = Coordinator(sim.cfg, "sim:2", sim.net.__class__(), role=STANDBY, clock=lambda: sim.t)
    standby.restore(sim.core.snapshot(), sim.core.state_seq, sim.core.term, sim.t)
    applied = len(state_updates(sim.net.published))  # contained in the snapshot

    def replicate() -> None:
        nonlocal applied
        sim.core.log.publish()
        updates = state_updates(sim.net.published)
        for u in updates[applied:]:
            assert u.seq == standby.state_seq + 1
            standby.apply_op(u.op, u.data, sim.t)
            standby.state_seq = u.seq
        applied = len(updates)

    sim.add_inputs("in", 300)
    a = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    b = sim.command("submit", model=DEAR, inputs="in/", batch=4)["job_id"]
    sim.run_until(4.0)
    replicate()
    for job in (a, b):
        assert standby.jobs.jobs[job].results.keys() == sim.core.jobs.jobs[job].results.keys()
    assert standby.master.files.keys() == sim.core.master.files.keys()
    assert set(standby.jobs.tasks) == set(sim.core.jobs.tasks)
    done_before = {j: len(sim.core.jobs.jobs[j].results) for j in (a, b)}

    # Take over: the standby becomes the simulation's coordinator; workers re-attach with what they hold.
    standby.promote(sim.t)
    assert standby.term == sim.core.term + 1
    sim.core = standby
    standby.net = sim.net
    sim.net.outbox.clear()
    for w in sim.workers.values():
        w.busy_until = sim.t
    sim.events.clear()  # results in flight at the old primary are lost with it: the work is redone
    from common.protocol import Join, Ready  # noqa: PLC0415

    for node in sim.workers:
        sim.deliver(node, Join(node, "worker", node.split("@")[0]))
        sim.deliver(node, Ready(node, 2, []))
    sim.run_until(120.0)
    for job in (a, b):
        j = standby.jobs.jobs[job]
        assert j.state == "done" and sorted(j.results) == list(range(300))
        assert j.stats.latencies.count == 300  # statistics continued, no reset, no double count
        assert len(j.results) >= done_before[job]


def test_handler_errors_and_non_requests_never_kill_the_coordinator():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1])
    # A result for an unknown job, a result with garbage qids, a malformed join id.
    node = next(iter(sim.workers))
    sim.deliver(node, TaskResult("t?", "nojob", node, 0.0, []))
    sim.add_inputs("in", 4)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    sim.deliver(node, TaskResult("t?", job, node, 0.0, [["garbage", None, None], [999, None, None], []]))
    from common.protocol import Join  # noqa: PLC0415

    sim.core.handle(b"no-incarnation", decode(Join("no-incarnation", "worker", "").encode()), sim.t)
    replies = sim.net.take()
    assert [(i, type(m)) for i, m in replies] == [(b"no-incarnation", Error)]  # a clear refusal, nothing else
    assert "malformed node id" in replies[0][1].message
    assert "no-incarnation" not in {m.node_id for m in sim.core.registry.members.values()}
    assert isinstance(sim.command("jobs"), list)
    assert not sim.core.jobs.jobs[job].results


def test_a_partial_result_requeues_the_unanswered_queries_and_task_ids_carry_the_term():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1], cfg=WHOLE_BATCHES)
    sim.add_inputs("in", 4)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    node = next(iter(sim.workers))
    task = sim.workers[node].received[0]
    assert task.task_id.startswith("t1.")  # term 1: ids cannot collide with a later primary's
    sim.events.clear()
    q = task.queries[0]
    sim.deliver(node, TaskResult(task.task_id, job, node, 0.01,
                                 [[q["index"], [["a", 1.0]], None]]))
    j = sim.core.jobs.jobs[job]
    out_again = sorted([*j.pending, *(i for t in sim.core.jobs.tasks.values() for i in t.indexes)])
    assert len(j.results) == 1 and out_again == [1, 2, 3]  # queued again (or already re-dispatched)
    sim.run_until(5.0)
    assert j.state == "done" and sorted(j.results) == [0, 1, 2, 3]


def _held(sim: SimCluster, node: str) -> int:
    return len(sim.core.jobs.tasks_of(node))


def test_reattach_with_resent_results_never_overcommits_the_worker():
    sim = SimCluster({CHEAP: 1.0}, speeds=[1, 1])
    sim.add_inputs("in", 100)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=2, start=True)["job_id"]
    node = next(iter(sim.workers))
    held = [t for t in sim.workers[node].received]
    assert len(held) == 2  # credit 2
    from common.protocol import Join, Ready  # noqa: PLC0415

    # The worker re-attaches (as after a takeover) holding one finished-unacknowledged task and one
    # still computing; it re-sends the finished result, then announces its slots.
    sim.events.clear()
    sim.deliver(node, Join(node, "worker", node.split("@")[0], inflight=[t.task_id for t in held]))
    done = held[0]
    sim.deliver(node, TaskResult(done.task_id, job, node, 1.0,
                                 [[q["index"], [["a", 1.0]], None] for q in done.queries]))
    assert _held(sim, node) == 1  # nothing dispatched before its Ready
    sim.deliver(node, Ready(node, 2, []))
    assert _held(sim, node) == 2


def test_a_repeated_ready_does_not_overcommit_the_worker():
    """A retried Join gets two Welcomes, so the worker sends Ready twice; tasks cross the second one."""
    sim = SimCluster({CHEAP: 1.0}, speeds=[1])
    sim.add_inputs("in", 100)
    sim.command("submit", model=CHEAP, inputs="in/", batch=2, start=True)
    node = next(iter(sim.workers))
    from common.protocol import Ready  # noqa: PLC0415

    assert _held(sim, node) == 2
    for _ in range(3):
        sim.deliver(node, Ready(node, 2, []))
        assert _held(sim, node) == 2


def test_a_failed_task_send_does_not_strand_the_worker():
    """A send that fails once (a reconnect) skips the worker for that pass only."""
    sim = SimCluster({CHEAP: 0.01}, speeds=[1])
    node = next(iter(sim.workers))
    real_send, failed = sim.net.send, []

    def flaky(identity: bytes, msg) -> bool:
        if isinstance(msg, (Task, Bundle)) and not failed:  # a pass's Tasks for a worker leave in one frame
            failed.append(msg)
            return False
        return real_send(identity, msg)

    sim.net.send = flaky
    sim.add_inputs("in", 40)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    assert failed
    sim.run_until(1.0)  # the loop's next tick dispatches again (the sim ticks at the end of a run)
    sim.run_until(30.0)  # no Ready is sent again: the worker keeps its slots by its results alone
    j = sim.core.jobs.jobs[job]
    assert j.state == "done" and sorted(j.results) == list(range(40))
    assert sim.core.slots[node].credit == sim.cfg.worker_credit


def test_an_unknown_task_listed_at_reattach_frees_its_slot_after_the_task_timeout():
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=30.0, worker_credit=2)
    sim = SimCluster({CHEAP: 0.01}, speeds=[1], cfg=cfg)
    node = next(iter(sim.workers))
    from common.protocol import Join, Ready  # noqa: PLC0415

    # Its result was acknowledged by another coordinator: this one never hears of it again.
    sim.deliver(node, Join(node, "worker", node.split("@")[0], inflight=["t9.1-job9-elsewhere"]))
    sim.deliver(node, Ready(node, 2, []))
    assert sim.core.slots[node].credit == 1
    sim.run_until(31.0)
    assert sim.core.slots[node].credit == 2


def test_results_carry_completion_time_and_dispatch_count_and_duplicates_are_counted():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1], cfg=WHOLE_BATCHES)
    sim.add_inputs("in", 4)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    node = next(iter(sim.workers))
    task = sim.workers[node].received[0]
    # The task times out and goes out again: every query is dispatched twice.
    sim.core.jobs.tasks[task.task_id].deadline = -1.0
    sim.core.tick(sim.t)
    sim._route()
    again = sim.workers[node].received[-1]
    assert again.task_id != task.task_id
    answers = [[q["index"], [["a", 0.5]], None] for q in task.queries]
    sim.t = 7.0
    sim.deliver(node, TaskResult(again.task_id, job, node, 0.1, answers))  # answers the second dispatch
    sim.t = 8.0
    sim.deliver(node, TaskResult(task.task_id, job, node, 0.1, answers))  # the first one, late: 4 duplicates
    res = sim.command("results", job=job)["results"]
    assert [(r["dispatches"], r["arrivals"], r["accepted"]) for r in res] == [(2, 2, 1)] * 4
    assert [r["completed_at"] for r in res] == [7.0] * 4
    rate = sim.command("query_rate", job=job)["jobs"][job]
    assert rate["count"] == 4 and rate["duplicates"] == 4
    assert sim.core.metrics_snapshot(sim.t)["jobs"][job]["duplicates"] == 4


def test_results_cursor_pages_in_completion_order():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1, 1])
    sim.add_inputs("in", 30)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    seen, cursor = [], 0
    while True:
        sim.run_until(sim.t + 0.05)
        page = sim.command("results", job=job, after=cursor, limit=7)
        assert len(page["results"]) <= 7 and page["next"] == cursor + len(page["results"])
        seen += page["results"]
        cursor = page["next"]
        if page["job"]["state"] == "done" and not page["results"]:
            break
    assert sorted(int(r["qid"].split(":")[1]) for r in seen) == list(range(30))  # each exactly once
    times = [r["completed_at"] for r in seen]
    assert times == sorted(times)


def test_cancel_drops_pending_lets_in_flight_finish_and_keeps_results():
    sim = SimCluster({CHEAP: 0.1}, speeds=[1, 1])
    sim.add_inputs("in", 100)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    sim.run_until(1.0)
    before = len(sim.core.jobs.jobs[job].results)
    in_flight = sim.core.jobs.in_flight(job)
    assert before > 0 and in_flight > 0
    out = sim.command("cancel", job=job)
    assert out["state"] == "cancelled" and out["in_flight"] == in_flight
    assert out["dropped"] == 100 - before - in_flight and out["finished"] is None
    sent = len(sim.dispatches)
    sim.run_until(30.0)
    j = sim.core.jobs.jobs[job]
    assert len(sim.dispatches) == sent  # nothing dispatched after the cancel
    assert len(j.results) == before + in_flight  # the in-flight queries finished and were kept
    assert j.state == "cancelled" and j.finished is not None and not j.pending
    assert sim.command("cancel", job=job)["dropped"] == 0  # idempotent
    # Another job still runs on the freed workers.
    other = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    sim.run_until(60.0)
    assert sim.core.jobs.jobs[other].state == "done"


def test_cancel_is_replicated_to_the_standby_and_survives_a_snapshot():
    sim = SimCluster({CHEAP: 0.1}, speeds=[1])
    sim.add_inputs("in", 50)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    sim.run_until(1.0)
    sim.command("cancel", job=job)
    standby = Coordinator(sim.cfg, "sim:2", sim.net.__class__(), role=STANDBY, clock=lambda: sim.t)
    standby.restore(sim.core.snapshot(), sim.core.state_seq, sim.core.term, sim.t)
    j = standby.jobs.jobs[job]
    assert j.state == "cancelled" and not j.pending
    assert j.counts == sim.core.jobs.jobs[job].counts  # restoring in-flight tasks does not recount
    fresh = Coordinator(sim.cfg, "sim:3", sim.net.__class__(), role=STANDBY, clock=lambda: sim.t)
    sim.core.log.publish()
    for u in state_updates(sim.net.published):
        fresh.apply_op(u.op, u.data, sim.t)
    assert fresh.jobs.jobs[job].state == "cancelled" and not fresh.jobs.jobs[job].pending


def test_a_retried_submit_returns_the_first_job_on_this_and_on_a_promoted_standby():
    from simcluster import MemoryNet  # noqa: PLC0415

    from broker.coordinator import STANDBY, Coordinator  # noqa: PLC0415
    from common.commands import with_request_id  # noqa: PLC0415

    sim = SimCluster({DEAR: 0.09}, speeds=[1])
    sim.add_inputs("in", 4)
    args = with_request_id("submit", {"model": DEAR, "inputs": "in/"})
    assert len(args["request_id"]) == 32 and with_request_id("jobs", {}) == {}
    first = sim.command("submit", **args)
    again = sim.command("submit", **args)  # the client's retry after a lost reply
    assert again["job_id"] == first["job_id"] and len(sim.core.jobs.jobs) == 1
    other = sim.command("submit", model=DEAR, inputs="in/", request_id="mine-2")
    assert other["job_id"] != first["job_id"]
    with pytest.raises(RuntimeError, match="at most 64"):
        sim.command("submit", model=DEAR, inputs="in/", request_id="x" * 65)
    # The standby learns the ids with the jobs: a retry that reaches it after a takeover is no new job.
    standby = Coordinator(sim.cfg, "sim:2", MemoryNet(), role=STANDBY, models=sim.core.models)
    standby.restore(sim.core.snapshot(), sim.core.state_seq, sim.core.term, sim.t)
    assert standby.jobs.by_request == {args["request_id"]: first["job_id"], "mine-2": other["job_id"]}


# -- one frame per query each way (issue #14): piggybacked acks, Bundles ----------------------


def _sent(sim: SimCluster, node: str) -> list:
    """The frames sent to ``node`` since the last look, decoded (a Bundle stays one message)."""
    out = [decode(b) for i, b in sim.net.outbox if i == node.encode()]
    sim.net.outbox.clear()
    return out


def test_a_final_result_is_acknowledged_by_the_next_task_or_alone_when_none_goes():
    cfg = Config(heartbeat_interval=1000.0, task_timeout_min=1e6, worker_credit=1, slow_start=False)
    sim = SimCluster({CHEAP: 0.01}, speeds=[1], cfg=cfg)
    node = next(iter(sim.workers))
    sim.add_inputs("in", 2)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=1, start=True)["job_id"]
    (first,) = sim.workers[node].received
    sim.events.clear()
    sim.net.outbox.clear()
    sim.core.handle(node.encode(), TaskResult(first.task_id, job, node, 0.01, [[first.queries[0]["index"],
                                                                                   [["a", 0.5]], None]]), sim.t)
    (frame,) = _sent(sim, node)  # one frame: the next Task, carrying the ack
    assert isinstance(frame, Task) and frame.acks == [first.task_id]
    sim.core.handle(node.encode(), TaskResult(frame.task_id, job, node, 0.01, [[frame.queries[0]["index"],
                                                                                   [["a", 0.5]], None]]), sim.t)
    (ack,) = _sent(sim, node)  # nothing left to send: the ack goes on its own
    assert isinstance(ack, ResultAck) and ack.task_id == frame.task_id and ack.final
    assert sorted(sim.core.jobs.jobs[job].results) == [0, 1]


def test_a_bundle_of_results_is_taken_in_once_each_and_answered_with_one_bundle_of_tasks():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1])  # credit 2
    node = next(iter(sim.workers))
    sim.add_inputs("in", 6)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=1, start=True)["job_id"]
    held = list(sim.workers[node].received)
    assert len(held) == 2
    sim.events.clear()
    sim.net.outbox.clear()
    results = [TaskResult(t.task_id, job, node, 0.01, [[t.queries[0]["index"], [["a", 0.5]], None]]) for t in held]
    bundle = decode(Bundle.of([*results, results[0]]).encode())  # the first one twice (a resend)
    sim.core.handle(node.encode(), bundle, sim.t, "worker")
    (frame,) = _sent(sim, node)  # one dispatch pass after the whole bundle: both Tasks in one frame
    assert isinstance(frame, Bundle) and [type(m) for m in frame.messages] == [Task, Task]
    # Every result is acknowledged (the resend too), all on the first Task.
    assert sorted(frame.messages[0].acks) == sorted([held[0].task_id, held[0].task_id, held[1].task_id])
    assert frame.messages[1].acks == []
    j = sim.core.jobs.jobs[job]
    assert len(j.results) == 2 and j.stats.duplicates == 1  # exactly once per query
