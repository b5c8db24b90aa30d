"""SDFS state survives restarts (issue 12): stable node names and data directories, `up --fresh` /
`down --purge` as the only wipes, and tombstones so a delete is never undone by a node that missed it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for

from cli.cluster import cluster_entries, purge_data_dir
from idunno import Client, SdfsFailed

REPO = Path(__file__).resolve().parent.parent


def idunno(*args: str, data_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), IDUNNO_DATA_DIR=str(data_dir), IDUNNO_TORCH_THREADS="1")
    env.pop("IDUNNO_COORDINATOR", None)
    env.pop("IDUNNO_STANDBY", None)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def sdfs_names(data_dir: Path) -> set[str]:
    with Client(data_dir=str(data_dir), timeout=5.0) as c:
        return {f["name"] for f in c.sdfs.ls("data/")}


@pytest.mark.slow
def test_down_up_keeps_every_file_and_fresh_or_purge_wipes(tmp_path):
    var = tmp_path / "var"
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i:02d}.bin": os.urandom(1000 * i + 1) for i in range(12)}
    files["big.bin"] = os.urandom(1_500_000)  # more than one chunk
    for name, data in files.items():
        (src / name).write_bytes(data)
    up = ["up", "--workers", "3", "--detach", "--timeout", "60"]
    try:
        ok(idunno(*up, data_dir=var))
        ok(idunno("sdfs", "put", "-r", str(src), "data/", data_dir=var))
        assert sdfs_names(var) == {f"data/{n}" for n in files}
        ok(idunno("down", data_dir=var))
        # The same nodes, by name, with their data directories: not one per port.
        assert {p.name for p in var.iterdir() if p.is_dir()} == {"coord-0", "coord-1", "worker-0", "worker-1",
                                                                   "worker-2", "logs", "keys"}

        out = ok(idunno(*up, data_dir=var))
        assert "come back with their replicas" in out
        wait_for(lambda: sdfs_names(var) == {f"data/{n}" for n in files}, timeout=30,
                 what="every file listed after down/up")
        got = tmp_path / "got"
        got.mkdir()
        with Client(data_dir=str(var), timeout=10.0) as c:
            for name, data in files.items():
                c.sdfs.get(f"data/{name}", got / name)
                assert (got / name).read_bytes() == data, name
            assert c.command("info")["sdfs"]["versions"] == len(files)  # nothing re-created as a new version
        ok(idunno("down", data_dir=var))

        ok(idunno("up", "--workers", "1", "--no-standby", "--detach", "--fresh", data_dir=var))
        assert sdfs_names(var) == set()
        ok(idunno("sdfs", "put", str(src / "f01.bin"), "data/again", data_dir=var))
        out = ok(idunno("down", "--purge", data_dir=var))
        assert "purged" in out
        assert not [p for p in var.iterdir() if p.name.startswith(("worker-", "coord-"))]
    finally:
        idunno("down", data_dir=var, timeout=60)


def test_purge_refuses_a_directory_that_is_not_only_the_clusters(tmp_path):
    var = tmp_path / "var"
    for d in ("coord-0/spool", "worker-0/sdfs", "logs"):
        (var / d).mkdir(parents=True)
    (var / "worker-0" / "sdfs" / "x").write_text("replica")
    (var / "cluster.json").write_text("{}")
    (var / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to wipe .*notes.txt"):
        purge_data_dir(str(var))
    assert (var / "worker-0" / "sdfs" / "x").exists()  # nothing removed
    r = idunno("up", "--fresh", "--workers", "1", data_dir=var, timeout=60)
    assert r.returncode == 1 and "refusing to wipe" in r.stderr
    r = idunno("down", "--purge", data_dir=var, timeout=60)
    assert r.returncode == 1 and "refusing to wipe" in r.stderr
    assert (var / "worker-0" / "sdfs" / "x").exists() and (var / "notes.txt").exists()
    (var / "notes.txt").unlink()
    (var / "keys").mkdir()  # the cluster's identity: kept by a wipe (clients hold copies of its keys)
    (var / "primary.json").write_text("{}")
    assert {p.name for p in cluster_entries(str(var))} == {"coord-0", "worker-0", "logs", "cluster.json",
                                                           "primary.json"}
    assert purge_data_dir(str(var)) == 5 and [p.name for p in var.iterdir()] == ["keys"]


@pytest.mark.slow
def test_a_deleted_file_stays_deleted_when_a_node_that_missed_the_delete_comes_back(make_cluster, tmp_path):
    c = make_cluster(workers=3)  # RF 4 > 3 nodes: every node holds every file
    local = tmp_path / "f"
    local.write_bytes(b"first content" * 1000)
    with Client(coordinator=c.coordinator, timeout=10.0) as client:
        assert client.sdfs.put(local, "doomed") == 1
        client.sdfs.put(local, "kept")
        away = next(p for p in c.worker_procs() if p.name == "worker-0")
        replica_dir = Path(away.data_dir) / "sdfs"
        assert any(replica_dir.rglob("*.meta")), "worker-0 holds no replica"
        c.kill(away, signal.SIGKILL)
        assert client.sdfs.delete("doomed") == 1
        # worker-0 comes back under its name (new port, new incarnation) and reports its stale copy.
        back = c.add_worker(name="worker-0")
        wait_for(lambda: any(m["data_addr"] == back.addr for m in c.alive_workers()), timeout=30,
                 what="worker-0 rejoined")
        # Its other replicas are adopted back (its report names them)...
        wait_for(lambda: back.addr in {r["addr"] for r in client.sdfs.ls("kept")[0]["versions"][0]["replicas"]},
                 timeout=15, what="kept adopted from the returning node")
        wait_for(lambda: "doomed" not in {n for n, *_ in client.sdfs.store(back.addr)}, timeout=15,
                 what="stale copy dropped on the returning node")
        assert [f["name"] for f in client.sdfs.ls("")] == ["kept"]
        with pytest.raises(SdfsFailed, match="no such file: doomed"):
            client.sdfs.get("doomed", tmp_path / "out")
        # A re-put after the delete gets a higher version than the deleted one.
        assert client.sdfs.put(local, "doomed") == 2
        # ... the tombstone stays until worker-1 and worker-2 report (their next start) or its TTL ends.
        assert client.command("info")["sdfs"]["tombstones"] == 1


def test_worker_data_dir_and_identity_follow_its_name(tmp_path):
    """`idunno worker --name` (no coordinator needed to see where its data goes)."""
    from cli.daemons import worker_name  # noqa: PLC0415
    from common.config import Config  # noqa: PLC0415
    from common.identity import default_node_name, make_node_id, split_node_id, validate_node_name  # noqa: PLC0415

    cfg = Config(host="127.0.0.1")
    assert worker_name(cfg, "gpu-box-1", 0) == "gpu-box-1"
    assert worker_name(cfg, None, 7200) == default_node_name("127.0.0.1", 7200) == "worker-127.0.0.1-7200"
    for bad in ("", "a/b", "x@1", "-lead", "a" * 65, "../up"):
        with pytest.raises(ValueError):
            validate_node_name(bad)
    node = make_node_id("worker-3", 17)
    assert node == "worker-3@17" and split_node_id(node) == ("worker-3", 17)
    assert json.loads(json.dumps(node)) == node


@pytest.mark.slow
def test_a_worker_whose_port_was_taken_is_started_again_under_its_name(make_cluster):
    import socket  # noqa: PLC0415

    c = make_cluster(workers=1)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        first = c.add_worker(port=taken, name="worker-x")
        first.popen.wait(timeout=30)  # exits: address in use
        c.wait_ready(2, timeout=60)
    again = [p for p in c.worker_procs() if p.name == "worker-x"]
    assert len(again) == 1 and again[0].addr != first.addr
    assert again[0].data_dir == first.data_dir
    assert any(m["node_id"].startswith("worker-x@") for m in c.alive_workers())
