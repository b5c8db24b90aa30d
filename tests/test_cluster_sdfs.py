"""SDFS on a real 5-node cluster: round trips, concurrency, failures, corruption, bad input."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import wait_for

from common.rpc import RpcError
from sdfs.client import SdfsClient, SdfsError
from sdfs.names import BadName

pytestmark = pytest.mark.slow


@pytest.fixture
def five(make_cluster):
    return make_cluster(workers=5)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_dir(cluster, proc) -> Path:
    return Path(proc.data_dir) / "sdfs"


def info(cluster) -> dict:
    return cluster.ctl("info")["sdfs"]


def test_round_trips_versions_ls_store_delete(five, tmp_path):
    client = SdfsClient(five.config())
    try:
        a, b = tmp_path / "a.bin", tmp_path / "b.bin"
        a.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # several chunks, odd tail
        b.write_bytes(b"second version\n")
        assert client.put(a, "dir/file.bin") == 1
        assert client.put(b, "dir/file.bin") == 2
        client.get("dir/file.bin", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == b.read_bytes()
        vs = client.get_versions("dir/file.bin", 5, tmp_path / "versions")
        assert [v["version"] for v in vs] == [2, 1]
        blob = (tmp_path / "versions").read_bytes()
        first, rest = blob.split(b"\n", 1)
        assert first.startswith(b"==> sdfs:dir/file.bin version 2 size 15 bytes")
        assert rest.startswith(b.read_bytes())
        assert a.read_bytes() in blob and b"version 1 size 3145745 bytes" in blob
        # A put returns at its write quorum (3 of 4); a target that lagged is brought in in the background.
        ls = wait_for(lambda: [f for f in client.ls("dir/") if all(len(v["replicas"]) == 4 for v in f["versions"])],
                      timeout=30, what="both versions at RF 4")
        assert [f["name"] for f in ls] == ["dir/file.bin"]
        holders = {r["addr"] for r in ls[0]["versions"][0]["replicas"]}
        assert len(holders) == 4
        both = holders & {r["addr"] for r in ls[0]["versions"][1]["replicas"]}  # 4 + 4 of 5 nodes overlap
        holders |= {r["addr"] for r in ls[0]["versions"][1]["replicas"]}
        stored = client.store(next(iter(both)))
        assert [s[:2] for s in stored if s[0] == "dir/file.bin"] == [["dir/file.bin", 1], ["dir/file.bin", 2]]
        assert client.delete("dir/file.bin")["deleted_versions"] == 2
        with pytest.raises(Exception, match="no such file"):
            client.get("dir/file.bin", tmp_path / "gone")
        wait_for(lambda: all(not [s for s in client.store(h) if s[0] == "dir/file.bin"] for h in holders),
                 timeout=5, what="replicas deleted on every node")
    finally:
        client.close()


def test_concurrent_puts_get_distinct_versions(five, tmp_path):
    results: list[int] = []
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        c = SdfsClient(five.config())
        try:
            p = tmp_path / f"w{i}"
            p.write_bytes(f"writer {i}\n".encode() * 1000)
            results.append(c.put(p, "shared.txt"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    client = SdfsClient(five.config())
    try:
        vs = client.get_versions("shared.txt", 5, tmp_path / "all")
        assert [v["version"] for v in vs] == [6, 5, 4, 3, 2]  # max_versions = 5 kept, newest first
    finally:
        client.close()


@pytest.mark.parametrize("n_frozen", [1, 2])
def test_put_goes_on_past_frozen_targets_and_reaches_rf_later(five, tmp_path, n_frozen):
    """Pipeline recovery: SIGSTOPped targets (alive to the detector for a while, answering nothing) are
    replaced or left behind; every put commits at its quorum (3 of 4) without them, and the files reach
    RF in the background. With two of five nodes frozen, a file placed on both needs a replacement."""
    client = SdfsClient(five.config())
    frozen = five.worker_procs()[:n_frozen]
    frozen_addrs = {p.addr for p in frozen}
    try:
        files = []
        for i in range(20):
            p = tmp_path / f"f{i}"
            p.write_bytes(os.urandom(30_000 + i))
            files.append(p)
        for p in frozen:
            p.popen.send_signal(signal.SIGSTOP)
        versions = client.put_many([(str(p), f"frozen/{p.name}") for p in files])
        # Every file committed (a retried put takes the next version number, so >= 1).
        assert sorted(versions) == sorted(f"frozen/{p.name}" for p in files) and min(versions.values()) >= 1
        listing = client.ls("frozen/")
        assert len(listing) == 20
        for f in listing:
            assert f["versions"][0]["version"] == versions[f["name"]]
            holders = {r["addr"] for r in f["versions"][0]["replicas"]}
            assert len(holders) >= 3 and not holders & frozen_addrs, f
        for p in files:
            client.get(f"frozen/{p.name}", tmp_path / "check")
            assert (tmp_path / "check").read_bytes() == p.read_bytes()
    finally:
        for p in frozen:
            p.popen.send_signal(signal.SIGCONT)
    try:
        wait_for(lambda: all(len(f["versions"][0]["replicas"]) == 4 for f in client.ls("frozen/")),
                 timeout=60, what="every file back at RF 4")
    finally:
        client.close()


def test_sigkill_holder_rereplicates_within_10s(five, tmp_path):
    client = SdfsClient(five.config())
    try:
        files = []
        for i in range(12):
            p = tmp_path / f"f{i}"
            p.write_bytes(os.urandom(50_000 + i))
            files.append(p)
        client.put_many([(str(p), f"kill/{p.name}") for p in files])
        client.put(files[0], "kill/f0")  # a second version too
        victim = five.worker_procs()[0]
        five.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(five.alive_workers()) == 4, timeout=5, what="failure detected")
        wait_for(lambda: info(five)["under_replicated"] == 0, timeout=10, what="re-replication to RF")
        for f in client.ls("kill/"):
            for v in f["versions"]:
                assert len(v["replicas"]) == 4
                assert victim.addr not in {r["addr"] for r in v["replicas"]}
        for p in files[1:]:
            client.get(f"kill/{p.name}", tmp_path / "check")
            assert (tmp_path / "check").read_bytes() == p.read_bytes()
        client.get_versions("kill/f0", 2, tmp_path / "v")
        assert (tmp_path / "v").read_bytes().count(files[0].read_bytes()) == 2
    finally:
        client.close()


def test_corrupt_replica_is_detected_served_correctly_and_repaired(five, tmp_path):
    client = SdfsClient(five.config())
    try:
        src = tmp_path / "good"
        src.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
        client.put(src, "precious.bin")
        v = client.locate("precious.bin")[0]
        bad = v["replicas"][0]
        proc = next(p for p in five.worker_procs() if p.addr == bad["addr"])
        replica = next(store_dir(five, proc).glob("files/*/1"))
        data = bytearray(replica.read_bytes())
        data[1000] ^= 0xFF
        replica.write_bytes(bytes(data))
        # Read with the corrupt replica first: the client must fall back and still return good bytes.
        v["replicas"] = [bad] + [r for r in v["replicas"] if r is not bad]
        out = tmp_path / "out"
        with open(out, "wb") as fh:
            client._download("precious.bin", v, fh)
        assert out.read_bytes() == src.read_bytes()
        wait_for(lambda: info(five).get("bad_replicas", 0) >= 1 and info(five)["under_replicated"] == 0,
                 timeout=10, what="bad replica reported and repaired")
        again = client.locate("precious.bin")[0]
        assert len(again["replicas"]) == 4
        for r in again["replicas"]:
            p = next(p for p in five.worker_procs() if p.addr == r["addr"])
            f = next(store_dir(five, p).glob("files/*/1"))
            assert sha(f) == v["checksum"]
    finally:
        client.close()


def test_target_killed_mid_put_leaves_no_partial_version(five, tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as fh:
        for _ in range(96):
            fh.write(os.urandom(1024 * 1024))
    client = SdfsClient(five.config())
    outcome: dict = {}

    def put() -> None:
        try:
            outcome["version"] = client.put(big, "big.bin")
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    victims = five.worker_procs()
    t = threading.Thread(target=put)
    t.start()
    # Kill whichever node first holds a partial write of it.
    victim = wait_for(lambda: next((p for p in victims if any(store_dir(five, p).glob("tmp/*.part"))), None),
                      timeout=20, interval=0.005, what="a transfer in progress")
    five.kill(victim, signal.SIGKILL)
    t.join(timeout=120)
    assert not t.is_alive()
    check = SdfsClient(five.config())
    try:
        if "error" in outcome:
            # Quorum (W = N) not reached: the version must be invisible and its replicas dropped.
            assert isinstance(outcome["error"], SdfsError)
            with pytest.raises(Exception, match="no such file"):
                check.locate("big.bin")
            wait_for(lambda: all(not list(store_dir(five, p).glob("files/*/1")) for p in five.worker_procs()),
                     timeout=10, what="orphan replicas dropped")
        else:
            check.get("big.bin", tmp_path / "big.out")
            assert sha(tmp_path / "big.out") == sha(big)
    finally:
        check.close()
        client.close()


def test_bad_names_and_missing_files_fail_clearly(five, tmp_path):
    client = SdfsClient(five.config())
    try:
        for name in ("../escape", "/abs", "a/../../b", "nul\x00byte", "x" * 300):
            with pytest.raises(BadName):
                client.put(__file__, name)
        with pytest.raises(SdfsError, match="local file not found"):
            client.put(tmp_path / "nope", "ok-name")
    finally:
        client.close()
    run = [sys.executable, "-m", "cli.main", "sdfs", "--data-dir", five.data_dir]
    env = dict(os.environ, **five.client_env())
    for args, message in [
        (["get", "no/such/file", str(tmp_path / "x")], "no such file"),
        (["put", str(tmp_path / "missing"), "x"], "local file not found"),
        (["put", __file__, "../x"], "'..'"),
        (["get_versions", "x"], "get_versions <sdfsname>"),
        (["frob"], "unknown command"),
        (["delete", "no-such"], "no such file"),
    ]:
        r = subprocess.run([*run, *args], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode != 0, args
        assert message in r.stderr, (args, r.stderr)


def test_a_get_while_the_holders_are_still_joining_waits_for_them(make_cluster, tmp_path):
    """Right after a cluster (re)starts the coordinator knows the file but no holder has joined yet
    (HDFS's safe mode): `get` asks again until one has, and fails clearly only after its wait."""
    c = make_cluster(workers=2, env={"IDUNNO_TORCH": "0"})
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(50_000))
    with SdfsClient(c.config()) as client:
        client.put(src, "a.bin")
    workers = [(int(p.addr.rsplit(":", 1)[1]), p.data_dir) for p in c.worker_procs()]
    for p in c.worker_procs():
        c.kill(p, signal.SIGTERM)
        p.popen.wait(timeout=30)
    wait_for(lambda: not [m for m in c.members() if m["role"] == "worker" and m["state"] == "alive"],
             timeout=30, what="workers gone")
    with SdfsClient(c.config().replace(request_timeout=0.5)) as client, \
            pytest.raises(RpcError, match="none of its .* replica holders is alive"):
        client.get("a.bin", tmp_path / "none")  # no holder comes back: the error, after the wait
    for port, d in workers:  # the same nodes (address, data and replicas) start again
        c.add_worker(port=port, data_dir=d)
    with SdfsClient(c.config().replace(request_timeout=60.0)) as client:  # a busy machine starts slowly
        client.get("a.bin", tmp_path / "back")
    assert sha(tmp_path / "back") == sha(src)
