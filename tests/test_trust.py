"""Issue #13: every message is checked against who sent it; hostile names and numbers are refused.

Coordinator logic over the in-memory transport (serialized messages, virtual time): each test
sends what a hostile or buggy peer could send and checks that the state did not change.
"""

from __future__ import annotations

import math

import pytest
from simcluster import WHOLE_BATCHES
from simcluster import SimCluster as _SimCluster

from common import protocol as P
from common import security
from common.protocol import Heartbeat, Join, Leave, Ready, Stored, TaskResult, decode

CHEAP, OTHER = "cheap", "other"


def SimCluster(costs: dict[str, float], speeds: list[float], cfg=None) -> _SimCluster:  # noqa: N802
    """These tests forge answers to whole tasks: no slow start, no streamed pieces."""
    return _SimCluster(costs, speeds, cfg or WHOLE_BATCHES)


def answers(task, label: str = "a") -> list[dict]:
    return [[q["index"], [[label, 0.5]], None] for q in task.queries]


def dropped(sim: SimCluster) -> dict[str, int]:
    return sim.command("info").get("dropped", {})


def two_jobs(sim: SimCluster, n: int = 8) -> tuple[str, str]:
    sim.add_inputs("in", n)
    a = sim.command("submit", model=CHEAP, inputs="in/", batch=n, start=True)["job_id"]
    b = sim.command("submit", model=OTHER, inputs="in/", batch=n)["job_id"]
    return a, b


# --------------------------------------------------------------------------------------------
# finding 6: results are checked against the task they answer


def test_a_result_naming_another_job_cannot_steal_that_jobs_task():
    sim = SimCluster({CHEAP: 1.0, OTHER: 1.0}, speeds=[1, 1])
    a, b = two_jobs(sim)
    tasks = {t.job_id: t for t in sim.core.jobs.tasks.values()}
    assert set(tasks) == {a, b}
    ta, tb = tasks[a], tasks[b]
    sim.events.clear()  # the simulated workers answer nothing by themselves from here on
    before = dropped(sim).get("bad_result", 0)
    # Job a's worker answers job a's task id but claims it belongs to job b, with b's query ids.
    forged = TaskResult(ta.task_id, b, ta.worker, 0.1,
                        [[i, [["stolen", 1.0]], None] for i in range(8)])
    sim.deliver(ta.worker, forged)
    jb, ja = sim.core.jobs.jobs[b], sim.core.jobs.jobs[a]
    assert not jb.results and not ja.results
    assert ta.task_id in sim.core.jobs.tasks and tb.task_id in sim.core.jobs.tasks  # nothing popped
    assert list(jb.pending) == [] and list(ja.pending) == []  # nothing re-queued into the wrong job
    assert dropped(sim).get("bad_result") == before + 1
    # The real answers still complete both jobs.
    for t in (ta, tb):
        task = next(x for x in sim.workers[t.worker].received if x.task_id == t.task_id)
        sim.deliver(t.worker, TaskResult(t.task_id, t.job_id, t.worker, 0.1, answers(task)))
    assert ja.state == "done" and jb.state == "done"
    assert all(r["top5"] == [["a", 0.5]] for r in jb.results.values())


def test_a_result_from_a_worker_that_does_not_hold_the_task_is_dropped():
    sim = SimCluster({CHEAP: 1.0}, speeds=[1, 1])
    sim.add_inputs("in", 4)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    (task,) = sim.core.jobs.tasks.values()
    other = next(w for w in sim.workers if w != task.worker)
    sim.events.clear()
    sent = next(x for x in sim.workers[task.worker].received if x.task_id == task.task_id)
    sim.deliver(other, TaskResult(task.task_id, job, other, 0.1, answers(sent, "wrong-worker")))
    assert not sim.core.jobs.jobs[job].results
    assert task.task_id in sim.core.jobs.tasks
    assert dropped(sim).get("bad_result") == 1


@pytest.mark.parametrize("case", ["index outside the task", "index outside the job", "index not a number",
                                  "not a list of pairs",
                                  "probability not finite", "duplicate query", "error not text"])
def test_a_result_with_entries_that_do_not_answer_the_task_is_dropped(case):
    sim = SimCluster({CHEAP: 1.0}, speeds=[1])
    sim.add_inputs("in", 8)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    node = next(iter(sim.workers))
    first = sim.workers[node].received[0]
    sim.events.clear()
    entries = answers(first)
    entry = {
        "index outside the task": [7, [["x", 1.0]], None],
        "index outside the job": [99, [["x", 1.0]], None],
        "index not a number": ["job9-cheap:0", [["x", 1.0]], None],
        "not a list of pairs": [entries[0][0], {"x": 1}, None],
        "probability not finite": [entries[0][0], [["x", math.nan]], None],
        "duplicate query": list(entries[0]),
        "error not text": [entries[0][0], None, ["boom"]],
    }[case]
    bad = [*entries[1:], entry] if case != "duplicate query" else [*entries, entry]
    sim.deliver(node, TaskResult(first.task_id, job, node, 0.1, bad))
    j = sim.core.jobs.jobs[job]
    assert not j.results, case
    assert first.task_id in sim.core.jobs.tasks
    assert dropped(sim).get("bad_result") == 1


@pytest.mark.parametrize("elapsed", [math.inf, math.nan, -1.0, 1e300])
def test_an_absurd_elapsed_cannot_poison_the_task_timeout(elapsed):
    sim = SimCluster({CHEAP: 0.01}, speeds=[1])
    sim.add_inputs("in", 16)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    node = next(iter(sim.workers))
    first = sim.workers[node].received[0]
    sim.events.clear()
    sim.deliver(node, TaskResult(first.task_id, job, node, elapsed, answers(first)))
    cost = sim.core.cost.get(CHEAP, 0.0)
    assert math.isfinite(cost) and cost <= 1.0, cost
    j = sim.core.jobs.jobs[job]
    timeout = sim.core.task_timeout(j, node)
    assert math.isfinite(timeout) and timeout <= 10 * sim.cfg.task_timeout_min
    compute = j.stats.compute
    assert math.isfinite(compute.mean) and math.isfinite(compute.m2) and compute.count == j.completed
    # ...nor reach the standby through the snapshot.
    assert all(math.isfinite(v) for per_worker in sim.core.snapshot()["cost"].values() for v in per_worker.values())


# --------------------------------------------------------------------------------------------
# finding 6: a message that names a node must come from that node


def test_messages_claiming_another_nodes_id_are_dropped_and_counted():
    sim = SimCluster({CHEAP: 1.0}, speeds=[1, 1])
    sim.add_inputs("in", 4)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    (task,) = sim.core.jobs.tasks.values()
    victim = task.worker
    sent = next(x for x in sim.workers[victim].received if x.task_id == task.task_id)
    sim.events.clear()
    sim.net.take()
    attacker = "127.0.0.1:6666@1"
    forged = [
        TaskResult(task.task_id, job, victim, 0.1, answers(sent, "forged")),
        Leave(victim),
        Heartbeat(victim, busy=99, models=["[red]x"]),
        Ready(victim, 64, []),
        Stored(victim, "in/img00000.jpg", 1, 100, "c" * 64, ok=False, error="forged"),
        Join(victim, "worker", "127.0.0.1:6666"),
    ]
    for ident in (attacker, "client", ""):
        for msg in forged:
            sim.core.handle(ident.encode(), decode(msg.encode()), sim.t)
    assert not sim.core.jobs.jobs[job].results  # 0 forged results accepted
    assert sim.core.registry.is_alive(victim)  # the forged Leave did nothing
    assert sim.core.slots[victim].slots == sim.cfg.worker_credit  # nor the forged Ready
    assert sim.core.registry.get(victim).busy != 99  # nor the forged Heartbeat
    assert sim.core.registry.get(victim).data_addr != "127.0.0.1:6666"  # nor the forged Join
    assert task.task_id in sim.core.jobs.tasks
    assert sim.net.take() == []  # a forged message gets no answer either
    assert dropped(sim).get("forged_sender") == 3 * len(forged)
    # The real worker is untouched: its result is accepted.
    sim.deliver(victim, TaskResult(task.task_id, job, victim, 0.1, answers(sent)))
    assert sim.core.jobs.jobs[job].state == "done"


def test_a_forged_heartbeat_to_the_standby_is_no_failover_vote():
    sim = SimCluster({CHEAP: 1.0}, speeds=[1])
    sim.core.role = "standby"
    node = next(iter(sim.workers))
    vote = sim.core.last_vote
    sim.core.handle(b"intruder", decode(Heartbeat(node).encode()), 5.0)
    sim.core.handle(b"intruder", decode(Join(node, "worker", "").encode()), 5.0)
    assert sim.core.last_vote == vote
    sim.core.handle(node.encode(), decode(Heartbeat(node).encode()), 5.0)
    assert sim.core.last_vote == 5.0


def test_dropped_messages_are_counted_in_metrics():
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

    from broker.metrics import CoordinatorCollector  # noqa: PLC0415

    sim = SimCluster({CHEAP: 1.0}, speeds=[1])
    node = next(iter(sim.workers))
    for _ in range(3):
        sim.core.handle(b"intruder", decode(Leave(node).encode()), sim.t)
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(lambda: sim.core.metrics_snapshot(sim.t)))
    text = generate_latest(registry).decode()
    assert 'idunno_messages_dropped_total{reason="forged_sender"} 3.0' in text


# --------------------------------------------------------------------------------------------
# finding 9: numbers in commands are range-checked, 0 is not "use the default"


@pytest.mark.parametrize(("args", "message"), [
    ({"batch": 0}, "batch must be at least 1"),
    ({"batch": -3}, "batch must be at least 1"),
    ({"batch": 2**63 - 1}, "batch must be at most 2147483647"),
    ({"batch": 257}, "batch size must be 1..256"),
    ({"batch": 1.5}, "batch must be an integer"),
    ({"batch": True}, "batch must be an integer"),
    ({"batch": "8"}, "batch must be an integer"),
    ({"weight": 0}, "weight must be at least 0.001"),
    ({"weight": 0.0}, "weight must be at least 0.001"),
    ({"weight": -1}, "weight must be at least 0.001"),
    ({"weight": math.inf}, "weight must be a finite number"),
    ({"weight": math.nan}, "weight must be a finite number"),
    ({"weight": 1e6}, "weight must be at most 1000"),
    ({"start": "no"}, "start must be true or false"),
])
def test_submit_refuses_numbers_out_of_range_instead_of_defaulting(args, message):
    sim = SimCluster({CHEAP: 0.01}, speeds=[1])
    sim.add_inputs("in", 3)
    with pytest.raises(RuntimeError, match=message):
        sim.command("submit", model=CHEAP, inputs="in/", **args)
    assert not sim.core.jobs.jobs  # nothing was submitted


def test_in_range_numbers_are_taken_as_given():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1])
    sim.add_inputs("in", 3)
    d = sim.command("submit", model=CHEAP, inputs="in/", batch=1, weight=0.5)
    assert (d["batch_size"], d["weight"]) == (1, 0.5)
    d = sim.command("submit", model=CHEAP, inputs="in/", batch=256, weight=1000)
    assert (d["batch_size"], d["weight"]) == (256, 1000.0)
    d = sim.command("submit", model=CHEAP, inputs="in/")  # defaults only when absent
    assert (d["batch_size"], d["weight"]) == (sim.cfg.default_batch_size, 1.0)


@pytest.mark.parametrize(("command", "args", "message"), [
    ("set_batch_size", {"n": 0}, "n must be at least 1"),
    ("set_batch_size", {"n": 2**63 - 1}, "n must be at most 2147483647"),
    ("set_batch_size", {"n": 257}, "batch size must be 1..256"),
    ("set_batch_size", {"n": math.inf}, "n must be an integer"),
    ("set_batch_size", {"n": -(2**63)}, "n must be at least 1"),
    ("results", {"limit": -1}, "limit must be at least 0"),
    ("results", {"limit": math.nan}, "limit must be an integer"),
])
def test_job_commands_refuse_numbers_out_of_range(command, args, message):
    sim = SimCluster({CHEAP: 0.01}, speeds=[1])
    sim.add_inputs("in", 3)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=2)["job_id"]
    with pytest.raises(RuntimeError, match=message) as err:
        sim.command(command, job=job, **args)
    assert "internal" not in str(err.value)
    assert sim.core.jobs.jobs[job].batch_size == 2


# --------------------------------------------------------------------------------------------
# finding 10: model names are resolved at submit


@pytest.mark.parametrize(("model", "hint"), [
    ("get_model", None), ("__init__", None), ("../../x", None), ("[/x]", None), ("list_models", None),
    ("alexnett", "alexnet"), ("resnet_50", "resnet50"), ("mobilenet_v3", "mobilenet_v3_small"),
])
def test_submit_refuses_unknown_models_with_close_matches(model, hint):
    sim = SimCluster({CHEAP: 0.01}, speeds=[1])
    sim.add_inputs("in", 3)
    with pytest.raises(RuntimeError, match="unknown model") as err:
        sim.command("submit", model=model, inputs="in/", start=True)
    if hint:
        assert "did you mean" in str(err.value) and hint in str(err.value)
    assert not sim.core.jobs.jobs


def test_submit_takes_model_names_as_users_spell_them():
    sim = SimCluster({CHEAP: 0.01}, speeds=[1])
    sim.add_inputs("in", 3)
    assert sim.command("submit", model=" ResNet ", inputs="in/")["model"] == "resnet50"
    assert sim.command("submit", model="AlexNet", inputs="in/")["job_id"].endswith("-alexnet")
    assert sim.command("submit", model="noop", inputs="in/")["model"] == "noop"
    assert sim.command("submit", model="vit_h_14", inputs="in/")["model"] == "vit_h_14"


def test_the_coordinator_knows_model_names_without_torch():
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = ("import sys, broker.server, broker.coordinator\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'models'))\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------
# findings 1, 2, 4: the sender's key role (from the envelope) decides what it may send


def samples(victim: str, job: str, task_id: str) -> dict[type, object]:
    """One well-formed message of every type the coordinator handles, each naming ``victim``."""
    return {
        Join: Join(victim, "worker", "127.0.0.1:6666"),
        Heartbeat: Heartbeat(victim, busy=99),
        P.Pulse: P.Pulse(victim),
        Leave: Leave(victim),
        Ready: Ready(victim, 64, []),
        TaskResult: TaskResult(task_id, job, victim, 0.1, []),
        Stored: Stored(victim, "in/img00000.jpg", 1, 100, "c" * 64, ok=False, error="forged"),
        P.StateRequest: P.StateRequest(41),
        P.StateFetch: P.StateFetch(41, 0, 0),
        P.ViewRequest: P.ViewRequest(42),
        P.PutBegin: P.PutBegin(43, [{"name": "x", "size": 1, "checksum": "00"}]),
        P.PutCommit: P.PutCommit(44, [{"put_id": "nope", "stored": [victim]}]),
        P.PutReplace: P.PutReplace(45, [{"put_id": "nope", "exclude": [], "count": 1}]),
        P.Locate: P.Locate(46, "in/img00000.jpg"),
        P.Delete: P.Delete(47, "nothing/here"),
        P.ListFiles: P.ListFiles(48, "in/"),
        P.ReportBad: P.ReportBad(victim, "in/img00000.jpg", 1, 49),
        P.Command: P.Command(50, "jobs"),
        P.Bundle: P.Bundle.of([TaskResult(task_id, job, victim, 0.1, [])]),
    }


@pytest.mark.parametrize("role", ["client", "", "coordinator", "worker"])
def test_every_message_type_is_checked_against_the_senders_key_role(role):
    """The forged-identity generator: every message type the coordinator handles, naming a live
    worker, sent from a peer whose key has ``role`` under that worker's routing id and under its own."""
    from broker.coordinator import SENDER_ROLES  # noqa: PLC0415

    sim = SimCluster({CHEAP: 1.0}, speeds=[1, 1])
    sim.add_inputs("in", 4)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=4, start=True)["job_id"]
    (task,) = sim.core.jobs.tasks.values()
    victim = task.worker
    msgs = samples(victim, job, task.task_id)
    assert set(msgs) == set(sim.core.handlers)  # a new message type must be added here (and to SENDER_ROLES)
    sim.events.clear()
    sim.net.take()
    members_before = sim.core.registry.view()
    for ident in (victim.encode(), b"127.0.0.1:6666@1"):
        for kind, msg in msgs.items():
            before = dict(dropped(sim))
            sim.core.handle(ident, decode(msg.encode()), sim.t, role)
            replies = sim.net.take()
            allowed = SENDER_ROLES.get(kind)
            # (A Bundle names no sender, but each of its parts is checked as if it came alone.)
            named = isinstance(msg, (Join, Heartbeat, Leave, Ready, TaskResult, Stored, P.Pulse, P.Bundle))
            if allowed is not None and role not in allowed:
                assert dropped(sim).get("wrong_role", 0) == before.get("wrong_role", 0) + 1, kind
                assert replies == [], kind  # not even an error: the sender learns nothing
            elif named and not (ident == victim.encode() and kind is not P.Pulse):
                assert dropped(sim).get("forged_sender", 0) == before.get("forged_sender", 0) + 1, kind
                assert replies == [], kind
            elif kind is P.StateRequest:  # only a coordinator key gets here: a transfer starts
                assert replies == [] and ident in sim.core.transfers, kind
            elif kind is P.StateFetch:
                assert [type(m) for _, m in replies] in ([P.StateChunk], [P.Error]), replies
    assert not sim.core.jobs.jobs[job].results  # 0 forged results accepted
    if role != "worker":
        assert sim.core.registry.view() == members_before  # no Join, Leave or Heartbeat took
        assert sim.core.registry.is_alive(victim)


def test_plain_mode_trusts_roles_but_still_checks_names():
    """Without keys (--insecure) there is no role to check (None); the node-id check still holds."""
    sim = SimCluster({CHEAP: 1.0}, speeds=[1])
    node = next(iter(sim.workers))
    sim.core.handle(b"intruder", decode(Leave(node).encode()), sim.t, None)
    assert sim.core.registry.is_alive(node) and dropped(sim) == {"forged_sender": 1}


def test_a_non_worker_key_on_a_workers_routing_id_gets_no_task_until_the_worker_speaks():
    """Finding 2: ROUTER handover gives a routing id to whoever connects with it last. While a
    non-worker key holds a worker's id, nothing is sent there; the worker's own key takes it back."""
    sim = SimCluster({CHEAP: 1.0}, speeds=[1])
    node = next(iter(sim.workers))
    sim.events.clear()
    sim.core.handle(node.encode(), decode(Heartbeat(node).encode()), sim.t, "client")
    sim.add_inputs("in", 4)
    job = sim.command("submit", model=CHEAP, inputs="in/", batch=2, start=True)["job_id"]
    assert not any(isinstance(m, P.Task) for _, m in sim.net.take())
    assert sim.core.registry.is_alive(node)  # and it is not blamed for anything
    sim.core.handle(node.encode(), decode(Heartbeat(node).encode()), sim.t, "worker")
    sim.core.dispatch(sim.t)
    assert [m.job_id for _, m in sim.net.take() if isinstance(m, P.Task)] == [job, job]


# --------------------------------------------------------------------------------------------
# finding 3: a data node stores a version only with the master's grant for it


def test_the_master_signs_each_planned_write():
    sim = SimCluster({CHEAP: 1.0}, speeds=[1, 1])
    sim.core.grant_key = KEY
    sim.core.handle(b"client", decode(P.PutBegin(1, [{"name": "f", "size": 3, "checksum": "ab"}]).encode()), sim.t,
                    "client")
    ((_, plan),) = sim.net.take()
    (p,) = plan.plans
    assert security.check_grant(KEY, p["grant"], "f", p["version"], 3, "ab") == ""
    assert security.check_grant(KEY, p["grant"], "f", p["version"] + 1, 3, "ab")


KEY = b"k" * 32


@pytest.mark.parametrize(("change", "why"), [
    ({}, ""),
    ({"name": "g"}, "does not match"),
    ({"version": 2}, "does not match"),
    ({"size": 4}, "does not match"),
    ({"checksum": "cd"}, "does not match"),
    ({"key": b"x" * 32}, "does not match"),
    ({"now": 1e12}, "expired"),
    ({"token": ""}, "no write grant"),
    ({"token": "9999999999.34"}, "does not match"),
    ({"token": "12.34"}, "expired"),
    ({"token": "abc"}, "no write grant"),
])
def test_a_grant_covers_exactly_one_file_version(change, why):
    token = change.get("token", security.grant(KEY, "f", 1, 3, "ab"))
    got = security.check_grant(change.get("key", KEY), token, change.get("name", "f"), change.get("version", 1),
                               change.get("size", 3), change.get("checksum", "ab"), now=change.get("now"))
    assert (why in got) if why else got == ""


def test_a_storage_node_with_keys_refuses_writes_without_the_masters_grant(tmp_path):
    import hashlib  # noqa: PLC0415

    import zmq  # noqa: PLC0415

    from common.config import Config  # noqa: PLC0415
    from sdfs.server import StorageServer  # noqa: PLC0415
    from sdfs.store import LocalStore  # noqa: PLC0415

    ctx = zmq.Context()
    server = StorageServer(Config(host="127.0.0.1"), LocalStore(tmp_path / "node"), ctx=ctx, grant_key=KEY)
    replies: list = []
    server.reply = lambda ident, msg: replies.append(msg)  # type: ignore[method-assign]
    try:
        data = b"planted"
        digest = hashlib.sha256(data).hexdigest()
        for token in ("", security.grant(KEY, "vfile", 1, len(data), digest), "1.2"):
            server.on_write(b"peer", P.WriteChunk(1, "vfile", 99, 0, data, len(data), digest, True, token))
        assert [(a.ok, "grant" in a.error) for a in replies] == [(False, True)] * 3
        assert server.store.list() == []
        good = security.grant(KEY, "vfile", 99, len(data), digest)
        server.on_write(b"peer", P.WriteChunk(2, "vfile", 99, 0, data, len(data), digest, True, good))
        assert replies[-1].ok and [(i.name, i.version) for i in server.store.list()] == [("vfile", 99)]
    finally:
        server.sock.close(0)
        ctx.term()


# --------------------------------------------------------------------------------------------
# finding 5: log records are shown as text, never as terminal commands


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain text", "plain text"),
    ("\x1b[31mred\x1b[0m", "red"),
    ("\x1b]0;title\x07after", "after"),
    ("\x1b[2J\x1b[Hcleared", "cleared"),
    ("bell\x07 cr\r del\x7f c1\x9b2J", "bell? cr? del? c1"),
    ("two\n10:00:00.000 coord-x INFO forged: line", "two\n    10:00:00.000 coord-x INFO forged: line"),
])
def test_log_records_are_shown_without_escape_codes(raw, shown):
    from cli.logs import printable  # noqa: PLC0415

    assert printable(raw) == shown
