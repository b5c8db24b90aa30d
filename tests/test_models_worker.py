"""The worker's choice of weights (worker/executor.py WeightsResolver) against a fake SDFS, in one process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from common.config import Config
from common.protocol import ErrorCode
from common.rpc import RpcError, Unavailable
from models import registry
from worker.executor import WeightsResolver


class FakeSdfs:
    """``locate``/``get`` of an SdfsClient over a dict ``{name: (version, data)}``; ``down`` = no answer."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, bytes]] = {}
        self.down = False
        self.locates = 0
        self.gets = 0
        self.waits: list[float | None] = []  # get's wait: a worker's fetch thread never waits

    def _v(self, name: str) -> dict[str, Any]:
        version, data = self.files[name]
        return {"version": version, "size": len(data), "checksum": f"sum{hash(data) & 0xffff:x}"}

    def locate(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        self.locates += 1
        if self.down:
            raise Unavailable("no reply within 2.0s")
        if name not in self.files:
            raise RpcError(ErrorCode.NOT_FOUND, f"no such file: {name}")
        return [self._v(name)]

    def get(self, name: str, local: str | os.PathLike[str], wait: float | None = None) -> dict[str, Any]:
        self.waits.append(wait)
        self.gets += 1
        Path(local).write_bytes(self.files[name][1])
        return self._v(name)


class FakeStore:
    def __init__(self, held: dict[tuple[str, int], Path] | None = None) -> None:
        self.held = held or {}

    def has(self, name: str, version: int) -> bool:
        return (name, version) in self.held

    def path(self, name: str, version: int) -> Path:
        return self.held[(name, version)]


@pytest.fixture(autouse=True)
def _empty_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path_factory.mktemp("hub")))
    yield
    torch.hub.set_dir(old)


def resolver(tmp_path: Path, interval: float = 0.0, store: FakeStore | None = None) -> WeightsResolver:
    return WeightsResolver(Config(weights_check_interval=interval), store or FakeStore(), tmp_path / "cache")


def test_sources_in_order_pinned_sdfs_hub_seeded(tmp_path: Path) -> None:
    sdfs, r = FakeSdfs(), resolver(tmp_path)
    seeded = r.resolve(sdfs, sdfs, "resnet")  # an alias resolves to the torchvision name
    assert seeded.label == "seeded" and seeded.path is None and seeded.error is None
    assert seeded.key[0] == "resnet50" and seeded.slot == ("resnet50", "")
    assert r.resolve(sdfs, sdfs, "alexnet").key != seeded.key, "two seeded models are two models"

    hub = registry.hub_cache_path(registry.default_weights("resnet50"))
    os.makedirs(os.path.dirname(hub))
    Path(hub).write_bytes(b"hub")
    assert r.resolve(sdfs, sdfs, "resnet50").label == f"hub-cache:{hub}"

    sdfs.files["models/resnet50.pth"] = (3, b"v3")
    spec = r.resolve(sdfs, sdfs, "resnet50")
    assert spec.label == "sdfs:models/resnet50.pth v3" and Path(spec.path).read_bytes() == b"v3"

    sdfs.files["ckpts/mine.pth"] = (1, b"mine")
    pinned = r.resolve(sdfs, sdfs, "resnet50", "ckpts/mine.pth")
    assert pinned.label == "sdfs:ckpts/mine.pth v1" and pinned.slot == ("resnet50", "ckpts/mine.pth")
    missing = r.resolve(sdfs, sdfs, "resnet50", "ckpts/gone.pth")
    assert missing.error == "pinned weights 'ckpts/gone.pth' not found in SDFS", "never other weights"
    assert "unknown model" in (r.resolve(sdfs, sdfs, "resnet05").error or "")


def test_a_new_version_is_fetched_and_a_deleted_file_reported(tmp_path: Path) -> None:
    sdfs, r = FakeSdfs(), resolver(tmp_path)
    sdfs.files["models/alexnet.pth"] = (1, b"one")
    first = r.resolve(sdfs, sdfs, "alexnet")
    assert r.resolve(sdfs, sdfs, "alexnet").key == first.key and sdfs.gets == 1, "a version is downloaded once"
    assert sdfs.waits == [0.0]  # the fetch thread does not wait for holders to join
    sdfs.files["models/alexnet.pth"] = (2, b"two")
    second = r.resolve(sdfs, sdfs, "alexnet")
    assert second.key != first.key and second.slot == first.slot and Path(second.path).read_bytes() == b"two"
    assert Path(first.path).exists(), "a batch prepared against version 1 can still load it"
    del sdfs.files["models/alexnet.pth"]
    assert r.resolve(sdfs, sdfs, "alexnet").label == "seeded"
    assert r.gone.get_nowait() == ("alexnet", ""), "the compute stage is told to unload it"


def test_sdfs_is_asked_once_per_interval_and_silence_keeps_the_known_weights(tmp_path: Path) -> None:
    sdfs, r = FakeSdfs(), resolver(tmp_path, interval=3600)
    sdfs.files["models/alexnet.pth"] = (1, b"one")
    key = r.resolve(sdfs, sdfs, "alexnet").key
    for _ in range(5):
        assert r.resolve(sdfs, sdfs, "alexnet").key == key
    assert sdfs.locates == 1
    r2 = resolver(tmp_path / "b")
    r2.resolve(sdfs, sdfs, "alexnet")
    sdfs.down = True  # a failover: no answer
    assert r2.resolve(sdfs, sdfs, "alexnet").key == key
    assert r2.gone.empty()


def test_a_replica_on_this_node_is_read_in_place(tmp_path: Path) -> None:
    replica = tmp_path / "replica"
    replica.write_bytes(b"stored here")
    sdfs = FakeSdfs()
    sdfs.files["models/alexnet.pth"] = (4, b"stored here")
    r = resolver(tmp_path, store=FakeStore({("models/alexnet.pth", 4): replica}))
    assert r.resolve(sdfs, sdfs, "alexnet").path == str(replica) and sdfs.gets == 0
