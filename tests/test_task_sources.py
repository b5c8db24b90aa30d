"""A Task names the replicas of the inputs its worker does not hold (issue #14: no Locate per input)."""

from __future__ import annotations

from typing import Any

from simcluster import SimCluster

from sdfs.client import SdfsError
from worker.executor import Executor


def test_a_task_carries_the_replicas_of_inputs_its_worker_does_not_hold():
    sim = SimCluster({"m": 0.01}, speeds=[1, 1])
    holder, other = list(sim.workers)
    sim.core.master.node_report(holder, [[f"in/img{i:05d}.jpg", 1, 100, "c" * 64] for i in range(20)])
    sim.command("submit", model="m", inputs="in/", batch=2, start=True)
    sim.run_until(2.0)
    to_holder = [q for t in sim.workers[holder].received for q in t.queries]
    to_other = [q for t in sim.workers[other].received for q in t.queries]
    assert to_holder and to_other
    assert all("source" not in q for q in to_holder)  # it reads its own replica
    for q in to_other:
        src = q["source"]
        assert (src["version"], src["size"], src["checksum"]) == (q["version"], 100, "c" * 64)
        assert src["replicas"] == [{"node_id": holder, "addr": holder.split("@")[0]}]


class FakeClient:
    def __init__(self, bad: set[str]) -> None:
        self.bad = bad  # replica addresses that fail to serve
        self.located = 0
        self.read_from: list[str] = []

    def locate(self, name: str, count: int) -> list[dict[str, Any]]:
        self.located += 1
        return [{"version": 1, "replicas": [{"addr": "fresh:1", "node_id": "fresh"}]}]

    def get_bytes(self, name: str, v: dict[str, Any]) -> bytes:
        addr = v["replicas"][0]["addr"]
        self.read_from.append(addr)
        if addr in self.bad:
            raise SdfsError(f"{addr} does not serve {name}")
        return addr.encode()


def test_the_worker_reads_from_the_tasks_replicas_and_falls_back_to_locate():
    source = {"version": 1, "replicas": [{"addr": "named:1", "node_id": "named"}]}
    client = FakeClient(bad=set())
    assert Executor._read_remote(client, "in/a.jpg", 1, source) == b"named:1"
    assert client.located == 0  # no request to the coordinator
    client = FakeClient(bad={"named:1"})
    assert Executor._read_remote(client, "in/a.jpg", 1, source) == b"fresh:1"
    assert (client.located, client.read_from) == (1, ["named:1", "fresh:1"])
    client = FakeClient(bad=set())  # no source, a malformed one, or another version's: Locate
    for src in (None, {"bogus": 1}, {**source, "version": 2}):
        assert Executor._read_remote(client, "in/a.jpg", 1, src) == b"fresh:1"
    assert client.located == 3
