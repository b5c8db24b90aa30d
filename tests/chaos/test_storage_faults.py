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


def test_full_disk_fails_the_put_cleanly_and_corrupts_nothing(make_cluster, tiny_disk, tmp_path):
    c = make_cluster(workers=3)
    tiny = c.add_worker(data_dir=str(tiny_disk / "node"))
    wait_for(lambda: len(c.alive_workers()) == 4, timeout=30, what="tiny-disk worker joined")
    client = SdfsClient(c.config())
    try:
        small = tmp_path / "small"
        small.write_bytes(os.urandom(100_000))
        assert client.put(small, "small.bin") == 1  # RF 4 = every node, the tiny one included
        big = tmp_path / "big"
        big.write_bytes(os.urandom(5 * 1024 * 1024))  # does not fit in 2 MB
        with pytest.raises(SdfsError, match="write quorum not reached"):
            client.put(big, "big.bin")
        with pytest.raises(Exception, match="no such file"):
            client.locate("big.bin")
        # Nothing half-written is left anywhere, and what was stored before is intact.
        wait_for(lambda: not [p for p in tiny_disk.rglob("*") if p.is_file() and p.parent.name == "tmp"],
                 timeout=10, what="partial write removed")
        client.get("small.bin", tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == small.read_bytes()
        for name, version, size, checksum, _ in client.store(tiny.addr):
            data = next((tiny_disk / "node" / "sdfs" / "files").glob(f"*/{version}")).read_bytes()
            assert hashlib.sha256(data).hexdigest() == checksum and len(data) == size, name
        # The node is still useful for files that fit.
        assert client.put(small, "small.bin") == 2
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
