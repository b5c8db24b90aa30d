"""Weights files and the model memory budget, in one process (no cluster).

Downloads go to a loopback HTTP server the test starts, serving checkpoints the test generates.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import models
from common.config import load_config
from models import ModelCache, ModelTooLarge, NoRoom

SMALL = "mobilenet_v3_small"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _checkpoint(tmp_path: Path, seed: int = 1) -> tuple[bytes, str]:
    clf = models.Classifier(SMALL, seed=seed)
    path = tmp_path / f"ckpt{seed}.pth"
    torch.save(clf.model.state_dict(), path)
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def test_download_checks_the_hash_prefix_in_the_file_name(http_files, tmp_path: Path) -> None:
    base, files = http_files
    data, sha = _checkpoint(tmp_path)
    files[f"/{SMALL}-{sha[:8]}.pth"] = data
    files[f"/{SMALL}-deadbeef.pth"] = data  # a file whose name promises other bytes
    dest = tmp_path / "out" / "good.pth"
    assert models.download(f"{base}/{SMALL}-{sha[:8]}.pth", dest, timeout=5) == sha
    assert dest.read_bytes() == data
    assert models.validate(SMALL, dest).model == SMALL

    bad = tmp_path / "out" / "bad.pth"
    with pytest.raises(models.WeightsHashError, match='expected "deadbeef"'):
        models.download(f"{base}/{SMALL}-deadbeef.pth", bad, timeout=5)
    assert not bad.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.pth"], "no partial file left behind"


def test_download_failures_are_quick_and_clear(http_files, tmp_path: Path) -> None:
    base, _ = http_files
    with pytest.raises(models.WeightsDownloadError, match="HTTP 404"):
        models.download(f"{base}/missing-0123abcd.pth", tmp_path / "x.pth", timeout=5)
    # A port nobody listens on (the server's, once closed): refused at once, like an offline machine.
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(models.WeightsDownloadError, match="cannot download"):
        models.download(f"http://127.0.0.1:{port}/alexnet-owt-7be5be79.pth", tmp_path / "y.pth", timeout=5)
    assert time.monotonic() - t0 < 5
    assert not list(tmp_path.glob("*.pth"))


def test_published_url_mirror_and_hash_prefix() -> None:
    url = models.default_url("alexnet")
    assert url == "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"  # torchvision's Weights.url
    assert models.hash_prefix(url) == "7be5be79"
    assert models.default_url("resnet", "http://127.0.0.1:1/m/") == "http://127.0.0.1:1/m/resnet50-11ad3fa6.pth"
    assert models.hash_prefix("http://h/weights.pth") is None
    # The mirror is configuration (file or IDUNNO_WEIGHTS_MIRROR), like every other setting.
    assert load_config(env={"IDUNNO_WEIGHTS_MIRROR": "http://m/"}).weights_mirror == "http://m/"


def test_validate_refuses_files_that_do_not_fit(tmp_path: Path) -> None:
    data, _ = _checkpoint(tmp_path)
    path = tmp_path / "m.pth"
    path.write_bytes(data)
    info = models.validate(SMALL, path)
    assert info.tensors > 0 and info.nbytes > 1_000_000
    with pytest.raises(ValueError, match="do not fit"):
        models.validate("resnet18", path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load weights"):
        models.validate(SMALL, junk)
    with pytest.raises(ValueError, match="unknown model"):
        models.validate("nonsense-net", path)


def test_model_size_is_known_before_loading() -> None:
    clf = models.Classifier(SMALL)
    real = sum(t.numel() * t.element_size() for t in (*clf.model.parameters(), *clf.model.buffers()))
    assert models.model_nbytes(SMALL) == real
    assert models.model_nbytes("vit_h_14") > 2_000_000_000  # on the meta device: no memory, no time


class _Fake:
    def __init__(self, name: str) -> None:
        self.name = name


def _cache(budget: int, sizes: dict[str, int]) -> tuple[ModelCache, list[str]]:
    loads: list[str] = []
    cache = ModelCache(budget, estimate=lambda n: sizes[n])
    return cache, loads


def _get(cache: ModelCache, loads: list[str], name: str, key: object = None, slot: object = None, **kw) -> _Fake:
    def load() -> _Fake:
        loads.append(name)
        return _Fake(name)

    return cache.get(key or name, slot or name, name, load, **kw)


def test_cache_evicts_least_recently_used_within_the_budget() -> None:
    cache, loads = _cache(100, {"a": 40, "b": 40, "c": 40, "huge": 101})
    a = _get(cache, loads, "a")
    _get(cache, loads, "b")
    assert _get(cache, loads, "a") is a  # a hit: no load, and a is now the most recent
    _get(cache, loads, "c")  # 120 > 100: b (least recently used) goes
    assert cache.names() == ["a", "c"] and cache.used == 80 and cache.evictions == 1
    assert loads == ["a", "b", "c"]
    with pytest.raises(ModelTooLarge, match="more than this worker's model memory budget"):
        _get(cache, loads, "huge")
    assert cache.names() == ["a", "c"], "a model that can never fit evicts nothing"


def test_cache_holds_at_most_max_models_whatever_their_size() -> None:
    # pool_max_models: the coordinator's pools hold at most that many models per worker, and a worker
    # serving outside its pool (work-conserving fallback) still holds no more.
    loads: list[str] = []
    cache = ModelCache(10_000, estimate=lambda n: 1, max_models=2)
    for name in ("a", "b", "a", "c", "d"):
        _get(cache, loads, name)
        assert len(cache.names()) <= 2
    assert cache.names() == ["c", "d"] and cache.evictions == 2 and loads == ["a", "b", "c", "d"]
    _get(cache, loads, "d")  # a hit evicts nothing
    assert cache.evictions == 2
    with pytest.raises(NoRoom):  # a preload that would unload a model in use is refused
        _get(cache, loads, "e", spare_used_within=60.0)
    assert cache.names() == ["c", "d"]


def test_cache_new_weights_replace_the_old_and_errors_are_per_version() -> None:
    cache, loads = _cache(1000, {"m": 10})
    _get(cache, loads, "m", key=("m", 1), slot="m")

    def broken() -> _Fake:
        raise ValueError("bad file")

    for _ in range(2):  # the failure is remembered: the bad file is not read again for every batch
        with pytest.raises(RuntimeError, match="bad file"):
            cache.get(("m", 2), "m", "m", broken)
    assert cache.names() == [], "version 1 was unloaded when version 2 was asked for"
    _get(cache, loads, "m", key=("m", 3), slot="m")  # a new version is tried, and serves
    assert [e.slot for e in cache.entries()] == ["m"] and loads == ["m", "m"]
    assert cache.drop_slot("m") and cache.names() == []


def test_preload_never_evicts_a_model_in_use() -> None:
    cache, loads = _cache(100, {"a": 60, "b": 60})
    _get(cache, loads, "a")
    with pytest.raises(NoRoom, match="a"):
        _get(cache, loads, "b", spare_used_within=60.0)
    assert cache.names() == ["a"]
    _get(cache, loads, "b", spare_used_within=0.0)  # a is idle by that measure: it may go
    assert cache.names() == ["b"]


@pytest.mark.parametrize("key,value", [("MODEL_MEMORY_MB", "-1"), ("DOWNLOAD_TIMEOUT", "0"),
                                       ("WEIGHTS_CHECK_INTERVAL", "nan"), ("MODEL_IN_USE_WINDOW", "-5")])
def test_model_settings_are_checked(key: str, value: str) -> None:
    with pytest.raises(ValueError, match="model_memory_mb"):
        load_config(env={f"IDUNNO_{key}": value})
    assert load_config(env={}).model_memory_mb == 0  # 0: derived from the machine (worker/executor.py)
