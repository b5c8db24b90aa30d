"""The coordinator's model hooks over the in-memory transport: Preload on submit, pinned weights in Task."""

from __future__ import annotations

import pytest
from simcluster import SimCluster

from common.protocol import Bundle, Message, Preload, Task


def recording(sim: SimCluster) -> list[tuple[str, Message]]:
    """Every message the coordinator sends from now on, as (identity, message)."""
    sent: list[tuple[str, Message]] = []
    send = sim.net.send

    def record(identity: bytes, msg: Message) -> bool:
        # A Bundle's parts one by one (a pass's Tasks for a worker leave in one frame).
        sent.extend((identity.decode(), m) for m in (msg.messages if isinstance(msg, Bundle) else [msg]))
        return send(identity, msg)

    sim.net.send = record  # type: ignore[method-assign]
    return sent


def test_submit_preloads_the_model_on_every_live_worker_even_before_start() -> None:
    sim = SimCluster({"cheap": 0.01}, speeds=[1, 1, 1])
    sim.add_inputs("in", 20)
    sent = recording(sim)
    job = sim.command("submit", model="cheap", inputs="in/", batch=4)
    assert job["state"] == "queued" and job["weights"] == ""
    preloads = {node: m for node, m in sent if isinstance(m, Preload)}
    assert set(preloads) == set(sim.workers)
    assert all(m.model == "cheap" and m.weights == "" for m in preloads.values())
    assert not [m for _, m in sent if isinstance(m, Task)], "a queued job sends no batch"
    sent.clear()
    sim.command("submit", model="noop", inputs="in/")  # nothing to load
    assert not [m for _, m in sent if isinstance(m, Preload)]


def test_a_pinned_checkpoint_must_exist_and_goes_with_every_task() -> None:
    sim = SimCluster({"cheap": 0.01}, speeds=[1, 1])
    sim.add_inputs("in", 12)
    with pytest.raises(RuntimeError, match="--weights: no such file: ckpts/a.pth"):
        sim.command("submit", model="cheap", inputs="in/", weights="ckpts/a.pth")
    for node in sim.workers:  # a store report is the node's whole store: the inputs and the checkpoint
        sim.core.master.node_report(node, [*([f"in/img{i:05d}.jpg", 1, 100, "c" * 64] for i in range(12)),
                                           ["ckpts/a.pth", 1, 100, "c" * 64]])
    sent = recording(sim)
    job = sim.command("submit", model="cheap", inputs="in/", batch=4, weights="ckpts/a.pth", start=True)
    assert job["weights"] == "ckpts/a.pth"
    assert {m.weights for _, m in sent if isinstance(m, Preload)} == {"ckpts/a.pth"}
    sim.run_until(5.0)
    tasks = [m for _, m in sent if isinstance(m, Task)]
    assert sum(len(t.queries) for t in tasks) == 12 and all(t.weights == "ckpts/a.pth" for t in tasks)
    # The standby's copy (and a restored primary's) keeps the pin.
    from broker.jobs import Job  # noqa: PLC0415

    assert Job.restore(sim.core.jobs.jobs[job["job_id"]].snapshot()).weights == "ckpts/a.pth"
