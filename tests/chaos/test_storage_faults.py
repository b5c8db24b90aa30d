"""SDFS under storage faults: a full disk, and a second failure during re-replication."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess

import pytest
from conftest import wait_for

from sdfs.client import SdfsClient, SdfsError

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("write_quorum", ["majority", "all"])
def test_full_disk_node_never_corrupts_and_fails_a_put_only_below_the_quorum(make_cluster, tiny_disk, tmp_path,
                                                                              write_quorum):
    """A node whose disk is full refuses a big replica. With the default W (a majority: 3 of 4) the put
    commits on the other three; with W = N (write_quorum = 4) and no other node to replace it, the put
    fails cleanly. Either way nothing half-written is left and earlier files are intact."""
    env = {"IDUNNO_WRITE_QUORUM": "4"} if write_quorum == "all" else {}
    c = make_cluster(workers=3, env=env)
    tiny = c.add_worker(data_dir=str(tiny_disk / "node"))
    wait_for(lambda: len(c.alive_workers()) == 4, timeout=30, what="tiny-disk worker joined")
    client = SdfsClient(c.config())
    try:
        small = tmp_path / "small"
        small.write_bytes(os.urandom(100_000))
        assert client.put(small, "small.bin") == 1  # RF 4 = every node, the tiny one included
        big = tmp_path / "big"
        big.write_bytes(os.urandom(5 * 1024 * 1024))  # does not fit in 2 MB
        if write_quorum == "all":
            with pytest.raises(SdfsError, match=r"write quorum not reached \(3/4 replicas; 4 storage nodes alive\)"):
                client.put(big, "big.bin")
            with pytest.raises(Exception, match="no such file"):
                client.locate("big.bin")
        else:
            version = client.put(big, "big.bin")
            (v,) = client.locate("big.bin")
            assert v["version"] == version and len(v["replicas"]) == 3
            assert tiny.addr not in {r["addr"] for r in v["replicas"]}
            client.get("big.bin", tmp_path / "big-back")
            assert (tmp_path / "big-back").read_bytes() == big.read_bytes()
        # Nothing half-written is left anywhere, and what was stored before is intact.
        wait_for(lambda: not [p for p in tiny_disk.rglob("*") if p.is_file() and p.parent.name == "tmp"],
                 timeout=10, what="partial write removed")
        client.get("small.bin", tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == small.read_bytes()
        for name, version, size, checksum, _ in client.store(tiny.addr):
            data = next((tiny_disk / "node" / "sdfs" / "files").glob(f"*/{version}")).read_bytes()
            assert hashlib.sha256(data).hexdigest() == checksum and len(data) == size, name
        # The node is still useful for files that fit.
        assert client.put(small, "small.bin") >= 2
    finally:
        client.close()


def test_second_node_killed_during_re_replication(make_cluster, tmp_path):
    c = make_cluster(workers=6)
    client = SdfsClient(c.config())
    try:
        files = []
        for i in range(30):
            p = tmp_path / f"f{i}"
            p.write_bytes(os.urandom(1024 * 1024 + i))
            files.append(p)
        client.put_many([(str(p), f"rr/{p.name}") for p in files])
        first, second = c.worker_procs()[:2]
        c.kill(first, signal.SIGKILL)

        def repairing() -> bool:
            info = c.ctl("info")["sdfs"]
            return info["repairs_in_progress"] > 0 or info.get("re_replications", 0) > 0

        wait_for(repairing, timeout=10, interval=0.02, what="re-replication under way")
        c.kill(second, signal.SIGKILL)
        wait_for(lambda: len(c.alive_workers()) == 4 and c.ctl("info")["sdfs"]["under_replicated"] == 0,
                 timeout=30, what="back to RF after two failures")
        for p in files:
            client.get(f"rr/{p.name}", tmp_path / "check")
            assert (tmp_path / "check").read_bytes() == p.read_bytes()
    finally:
        client.close()
