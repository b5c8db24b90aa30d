"""Model weights through a real local cluster: `models put/pull/ls`, the weights a worker picks, warm
starts and the memory budget. The check that matters: the cluster computes exactly what torchvision
computes on the same checkpoint and images.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import DATA, wait_for

import models
from cli.cluster import LocalCluster
from cli.main import main as idunno
from cli.models_cmd import weights_source
from common.rpc import RpcError
from sdfs.client import SdfsClient

pytestmark = pytest.mark.slow

MODEL = "resnet18"  # small enough for two busy cores, and its seeded weights give distinct probabilities
SMALL = "mobilenet_v3_small"
IMAGES = sorted(DATA.glob("*.jpg"))[:6]
BUDGET_MB = 150  # two resnet18 (45 MB each) and a mobilenet fit; alexnet (233 MB) never does


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty torch hub for the workers and this process: no real weights leak in from the machine."""
    home = tmp_path_factory.mktemp("torch-home")
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(home / "hub"))
    yield home
    torch.hub.set_dir(old)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, hub: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(workers=2, standby=False, data_dir=str(tmp_path_factory.mktemp("cluster")), torch_threads=1,
                     env={"TORCH_HOME": str(hub), "IDUNNO_MODEL_MEMORY_MB": str(BUDGET_MB),
                          # Every batch asks SDFS for the newest weights: a test's put is seen by the next job.
                          "IDUNNO_WEIGHTS_CHECK_INTERVAL": "0"})
    try:
        c.start(timeout=60)
        with SdfsClient(c.config()) as client:
            client.put_many([(str(p), f"in/{p.name}") for p in IMAGES])
        yield c
    finally:
        c.stop()
    assert not [p for p in c.procs if p.popen.poll() is None], "processes left running"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, and fair to the busy machine
    yield
    torch.set_num_threads(old)


def cli(cluster: LocalCluster, *args: str) -> int:
    return idunno([*args, "--coordinator", cluster.coordinator])


def checkpoint(tmp_path: Path, seed: int, model: str = MODEL) -> Path:
    path = tmp_path / f"{model}-seed{seed}.pth"
    torch.save(models.Classifier(model, seed=seed).model.state_dict(), path)
    return path


def run_job(cluster: LocalCluster, model: str = MODEL, **kw) -> list[dict]:
    job = cluster.ctl("submit", model=model, inputs="in/", batch=3, start=True, **kw)["job_id"]

    def done() -> bool:
        return next(j for j in cluster.ctl("jobs") if j["job_id"] == job)["state"] == "done"

    wait_for(done, timeout=60, interval=0.2, what=f"{job} to finish",
             progress=lambda: cluster.ctl("completed", job=job)[job]["completed"])
    res = cluster.ctl("results", job=job)["results"]
    assert sorted(r["input"] for r in res) == sorted(f"in/{p.name}" for p in IMAGES), "one result per input"
    return res


def assert_same_as_torchvision(results: list[dict], weights: Path | None, seed: int = 0) -> None:
    """Every result equals a local run of the same checkpoint (same preprocessing: models.Classifier)."""
    local = models.Classifier(MODEL, weights_path=None if weights is None else str(weights), seed=seed)
    for r in results:
        assert r["error"] is None, r["error"]
        expected = local.predict(models.decode_image((DATA / Path(r["input"]).name).read_bytes()))
        assert [label for label, _ in r["top5"]] == [label for label, _ in expected], r["input"]
        for (_, p), (_, q) in zip(r["top5"], expected, strict=True):
            assert abs(p - q) <= 1e-4, (r["input"], p, q)


def test_cluster_computes_what_torchvision_computes_on_a_put_checkpoint(cluster, tmp_path, capsys) -> None:
    ckpt = checkpoint(tmp_path, seed=7)
    assert cli(cluster, "models", "put", str(ckpt), MODEL) == 0
    assert f"stored {ckpt} as models/{MODEL}.pth version 1" in capsys.readouterr().out
    results = run_job(cluster)
    assert_same_as_torchvision(results, ckpt)
    # Not what the workers' seeded weights would say: the file really was used.
    seeded = models.Classifier(MODEL, seed=0).predict(models.decode_image(IMAGES[0].read_bytes()))
    first = next(r for r in results if r["input"] == f"in/{IMAGES[0].name}")
    assert [x[0] for x in first["top5"]] != [x[0] for x in seeded] or \
        abs(first["top5"][0][1] - seeded[0][1]) > 1e-3

    # `models ls` shows the SDFS file and the workers that loaded it (every worker: the submit preloaded it).
    def listed() -> dict | None:
        assert cli(cluster, "models", "ls", "--json") == 0
        rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
        row = rows.get(MODEL)
        return row if row and len(row["loaded_on"]) == 2 else None

    row = wait_for(listed, timeout=20, what=f"{MODEL} loaded on both workers")
    assert row["weights"] == "sdfs" and row["sdfs"]["version"] == 1 and row["sdfs"]["size"] == ckpt.stat().st_size


def test_a_new_version_is_loaded_and_a_deleted_file_is_dropped(cluster, tmp_path) -> None:
    newer = checkpoint(tmp_path, seed=8)
    assert cli(cluster, "models", "put", str(newer), MODEL) == 0
    assert_same_as_torchvision(run_job(cluster), newer)
    with SdfsClient(cluster.config()) as client:
        kind, text = weights_source(client, MODEL)  # what `idunno demo` prints per job
        assert kind == "sdfs" and text.startswith(f"SDFS checkpoint models/{MODEL}.pth v2")
        client.delete(f"models/{MODEL}.pth")
        kind, text = weights_source(client, MODEL)
        assert kind == "seeded" and f"idunno models pull {MODEL}" in text and f"idunno models put FILE {MODEL}" in text
    assert_same_as_torchvision(run_job(cluster), None, seed=0)  # back to the seeded weights (empty hub cache)


def test_a_job_pinned_to_a_checkpoint_uses_it(cluster, tmp_path, capsys) -> None:
    pinned = checkpoint(tmp_path, seed=9)
    assert cli(cluster, "models", "put", str(pinned), MODEL, "--sdfs-name", "ckpts/r18-a.pth") == 0
    assert "--weights ckpts/r18-a.pth" in capsys.readouterr().out
    assert_same_as_torchvision(run_job(cluster, weights="ckpts/r18-a.pth"), pinned)
    with pytest.raises(RpcError, match="no such file"):
        cluster.ctl("submit", model=MODEL, inputs="in/", weights="ckpts/missing.pth")


def test_put_refuses_weights_of_another_architecture(cluster, tmp_path, capsys) -> None:
    small = checkpoint(tmp_path, seed=1, model=SMALL)
    assert cli(cluster, "models", "put", str(small), "resnet34") == 1
    assert "do not fit" in capsys.readouterr().err
    with SdfsClient(cluster.config()) as client:
        assert not client.ls("models/resnet34.pth"), "nothing was uploaded"


def test_pull_checks_the_hash_and_stores_the_weights(cluster, tmp_path, capsys, http_files, monkeypatch) -> None:
    base, files = http_files
    data = checkpoint(tmp_path, seed=3, model=SMALL).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    # The published file name (its hash prefix is of torchvision's real weights) served with other bytes:
    published = Path(models.default_url(SMALL)).name
    files[f"/models/{published}"] = data
    monkeypatch.setenv("IDUNNO_WEIGHTS_MIRROR", f"{base}/models")
    assert cli(cluster, "models", "pull", SMALL) == 1
    assert "refused, nothing stored: " in capsys.readouterr().err
    with SdfsClient(cluster.config()) as client:
        assert not client.ls(f"models/{SMALL}.pth")
    # A file whose name carries its own hash is accepted, checked and stored.
    files[f"/mirror/{SMALL}-{sha[:8]}.pth"] = data
    assert cli(cluster, "models", "pull", SMALL, "--url", f"{base}/mirror/{SMALL}-{sha[:8]}.pth") == 0
    assert f"sha256 {sha[:16]}" in capsys.readouterr().out
    with SdfsClient(cluster.config()) as client:
        client.get(f"models/{SMALL}.pth", tmp_path / "back.pth")
    assert (tmp_path / "back.pth").read_bytes() == data
    # Offline (nothing answers): fails at once, naming the way to put a file by hand.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("IDUNNO_WEIGHTS_MIRROR", f"http://127.0.0.1:{port}/models")
    t0 = time.monotonic()
    assert cli(cluster, "models", "pull", SMALL) == 1
    assert time.monotonic() - t0 < 10
    assert f"idunno models put FILE {SMALL}" in capsys.readouterr().err


def test_submit_preloads_the_model_before_the_job_starts(cluster) -> None:
    job = cluster.ctl("submit", model="mnasnet0_5", inputs="in/", batch=3)  # queued: no batch goes out
    assert job["state"] == "queued"

    def everywhere() -> bool:
        return all("mnasnet0_5" in w["models"] for w in cluster.ctl("vm_info").values())

    wait_for(everywhere, timeout=30, interval=0.2, what="mnasnet0_5 preloaded on every worker")
    assert cluster.ctl("completed", job=job["job_id"])[job["job_id"]]["completed"] == 0

    def memory_reported() -> bool:  # the next heartbeat carries the loaded model's size
        return all(w["rss_mb"] > 0 and w["budget_mb"] > 0 and w["model_mb"].get("mnasnet0_5", 0) > 0
                   for w in cluster.ctl("vm_info").values())

    wait_for(memory_reported, timeout=15, interval=0.2, what="workers report RSS, budget and model sizes")
    info = cluster.ctl("vm_info")
    assert all(w["peak_rss_mb"] >= w["rss_mb"] for w in info.values()), info
    cluster.ctl("cancel", job=job["job_id"])


def test_a_model_larger_than_the_budget_gives_error_results_not_a_crash(cluster) -> None:
    results = run_job(cluster, model="alexnet")
    assert all(not r["top5"] and "model memory budget" in r["error"] for r in results), results[0]
    assert len(cluster.alive_workers()) == 2
    assert all(r["error"] is None for r in run_job(cluster, model=SMALL)), "the workers still serve"
