"""Issue #13, finding 12: `sdfs get` creates files with the mode the user's umask asks for."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from common.config import Config
from sdfs.client import SdfsClient
from sdfs.server import StorageServer
from sdfs.store import LocalStore

DATA = b"replica bytes\n" * 100


@pytest.fixture
def client_and_version(tmp_path: Path) -> Iterator[tuple[SdfsClient, dict]]:
    """A real storage server holding one replica, and a client told where it is (no coordinator)."""
    ctx = zmq.Context()
    store = LocalStore(tmp_path / "node")
    checksum = hashlib.sha256(DATA).hexdigest()
    w = store.begin("f/x.txt", 1, len(DATA), checksum)
    w.write(0, DATA)
    w.finish()
    server = StorageServer(Config(host="127.0.0.1"), store, ctx=ctx, port=0)
    server.start()
    client = SdfsClient(Config(host="127.0.0.1", coordinator="127.0.0.1:9"), ctx=ctx)
    version = {"version": 1, "size": len(DATA), "checksum": checksum, "mtime": 0.0,
               "replicas": [{"node_id": "n@1", "addr": server.addr}]}
    client.locate = lambda name, count=1, wait=0.0: [version] * min(count, 1)  # type: ignore[method-assign]
    try:
        yield client, version
    finally:
        client.close()
        server.stop()
        ctx.term()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077, 0o027])
def test_get_and_get_versions_honour_the_umask(client_and_version, tmp_path: Path, umask: int):
    client, _ = client_and_version
    old = os.umask(umask)
    try:
        client.get("f/x.txt", tmp_path / "got.txt")
        client.get_versions("f/x.txt", 3, tmp_path / "versions.txt")
    finally:
        os.umask(old)
    assert (tmp_path / "got.txt").read_bytes() == DATA
    for name in ("got.txt", "versions.txt"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o666 & ~umask, f"{name}: {oct(mode)} with umask {oct(umask)}"
    assert not list(tmp_path.glob(".*.part"))  # no temp file left behind
