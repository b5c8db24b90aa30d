"""CURVE: with keys configured, nodes and clients without an authorized key get nothing done."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import zmq

from common import protocol as P
from common import security

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


@pytest.fixture
def keys(tmp_path):
    good = security.init_keys(tmp_path / "keys")
    # A stranger who knows the servers' public key but whose own key is not authorized.
    stranger = security.init_keys(tmp_path / "stranger")
    shutil.copy(good / "server.key", stranger / "server.key")
    (stranger / "server.key_secret").unlink()
    security.enable(good)  # this test process acts as an authorized operator
    yield good, stranger
    security.disable()


def cli(cluster, args, curve_dir=None, timeout=60):
    env = dict(os.environ, IDUNNO_COORDINATOR=cluster.coordinator, IDUNNO_REQUEST_TIMEOUT="1",
               IDUNNO_REQUEST_RETRIES="1")
    env.pop("IDUNNO_CURVE_DIR", None)
    if curve_dir:
        env["IDUNNO_CURVE_DIR"] = str(curve_dir)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def raw_request(addr: str, msg: P.Message, wait_ms: int = 1500) -> bool:
    """A plain (non-CURVE) DEALER: True if anything at all comes back."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    # A DEALER blocks on send while it has no usable pipe, which is the case while the CURVE server
    # keeps refusing our plaintext handshake: a send that cannot even be queued got no answer either.
    s.setsockopt(zmq.SNDTIMEO, wait_ms)
    s.connect(f"tcp://{addr}")
    try:
        try:
            s.send(msg.encode())
        except zmq.Again:
            return False
        return bool(s.poll(wait_ms))
    finally:
        s.close()


def test_only_authorized_keys_can_join_submit_read_or_write(make_cluster, keys, tmp_path):
    good, stranger = keys
    c = make_cluster(workers=2, env={"IDUNNO_CURVE_DIR": str(good)})  # the workers joined: keys work
    src = tmp_path / "secret.txt"
    src.write_text("classified\n")
    ok = cli(c, ["sdfs", "put", str(src), "secret.txt"], curve_dir=good)
    assert ok.returncode == 0, ok.stderr
    ok = cli(c, ["ctl", "members"], curve_dir=good)
    assert ok.returncode == 0 and ok.stdout.count(" alive ") == 2
    for who in (stranger, None):  # a wrong key, and no CURVE at all
        for args in (["ctl", "members"], ["ctl", "submit", "alexnet", "secret"],
                     ["sdfs", "get", "secret.txt", str(tmp_path / "leak")], ["sdfs", "put", str(src), "evil.txt"]):
            r = cli(c, args, curve_dir=who)
            assert r.returncode != 0, (who, args, r.stdout)
    assert not (tmp_path / "leak").exists()
    # Raw plaintext peers: a would-be worker's Join and a direct replica read get no answer at all.
    worker_addr = c.worker_procs()[0].addr
    assert not raw_request(c.coordinator, P.Join("127.0.0.1:1@1", "worker", "127.0.0.1:1"))
    assert not raw_request(worker_addr, P.ReadChunk(1, "secret.txt", 1, 0, 100))
    # Nothing the strangers tried left a trace: one member set, no evil file, no extra job.
    assert len(c.alive_workers()) == 2
    assert c.ctl("jobs") == []
    from sdfs.client import SdfsClient  # noqa: PLC0415

    with SdfsClient(c.config()) as client:
        assert [f["name"] for f in client.ls("")] == ["secret.txt"]
