"""Command views (broker/views.py): what a client is shown, and that reading changes nothing."""

from __future__ import annotations

from simcluster import WHOLE_BATCHES, SimCluster

from broker.views import CommandError

CHEAP = "cheap"


def running_sim() -> tuple[SimCluster, str]:
    sim = SimCluster({CHEAP: 0.01}, speeds=[1, 1], cfg=WHOLE_BATCHES)
    sim.add_inputs("in", 40)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    sim.run_until(0.05)  # part of the job done, part in flight
    return sim, job


def test_every_read_leaves_the_state_and_the_op_stream_unchanged():
    sim, job = running_sim()
    views = sim.core.views
    before = (sim.core.snapshot(), sim.core.state_seq, len(sim.net.published), len(sim.net.outbox))
    reads = {"info": {}, "pending": {}, "completed": {}, "query_rate": {"job": job}, "query_time": {},
             "results": {"job": job, "after": 0, "limit": 5}, "vm_info": {}, "members": {}, "timeline": {},
             "status": {}, "jobs": {}}
    for name, args in reads.items():
        assert getattr(views, f"cmd_{name}")(args, sim.t) is not None, name
    views.metrics_snapshot(sim.t)
    assert (sim.core.snapshot(), sim.core.state_seq, len(sim.net.published), len(sim.net.outbox)) == before


def test_in_flight_and_completed_are_the_same_facts_in_every_view():
    sim, job = running_sim()
    views = sim.core.views
    j = sim.core.jobs.jobs[job]
    in_flight = sim.core.jobs.in_flight(job)
    assert 0 < j.completed < j.total and in_flight > 0
    assert views.cmd_pending({}, sim.t)[job]["in_flight"] == in_flight
    assert views.metrics_snapshot(sim.t)["jobs"][job]["in_flight"] == in_flight
    assert views.cmd_results({"job": job, "after": 0}, sim.t)["in_flight"] == in_flight
    completed = {views.cmd_completed({}, sim.t)[job]["completed"],
                 views.cmd_query_rate({}, sim.t)["jobs"][job]["count"],
                 views.metrics_snapshot(sim.t)["jobs"][job]["completed"], j.describe()["completed"]}
    assert completed == {j.completed}


def test_results_rows_by_index_and_by_cursor_are_the_same_rows():
    sim, job = running_sim()
    sim.run_until(5.0)
    views = sim.core.views
    by_index = views.cmd_results({"job": job}, sim.t)["results"]
    pages, after = [], 0
    while True:
        page = views.cmd_results({"job": job, "after": after, "limit": 7}, sim.t)
        pages += page["results"]
        if not page["results"]:
            break
        after = page["next"]
    assert len(by_index) == 40 and sorted(pages, key=lambda r: r["qid"]) == sorted(by_index, key=lambda r: r["qid"])
    assert [r["qid"] for r in by_index] == [f"{job}:{i}" for i in range(40)]


def test_vm_info_shows_each_workers_measured_cost_from_the_one_cost_table():
    sim, job = running_sim()
    info = sim.core.views.cmd_vm_info({}, sim.t)
    for node, row in info.items():
        assert row["cost_per_image"] == sim.core.state.costs.of_worker(node) > 0
        assert row["credit"] == sim.core.dispatcher.slots[node].credit


def test_an_unknown_job_is_a_clear_error():
    sim, _job = running_sim()
    try:
        sim.core.views.cmd_results({"job": "job42-x"}, sim.t)
    except CommandError as exc:
        assert exc.code == "not_found" and "job42-x" in str(exc)
    else:
        raise AssertionError("no error for an unknown job")
