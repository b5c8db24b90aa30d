"""``idunno demo``: the whole product in one command on this machine.

Starts a local cluster (coordinator, hot standby, workers), loads the images into SDFS, runs two
jobs concurrently (AlexNet and ResNet-50 by default) with a live view, prints the statistics and
where the results are, writes a run report, and stops the cluster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console

from cli import render
from cli.cluster import LocalCluster, env_insecure
from cli.models_cmd import weights_source
from cli.top import live_view
from common.config import Config
from sdfs.client import SdfsClient


def run_demo(ns: argparse.Namespace, console: Console) -> int:
    images = Path(ns.images)
    files = sorted(p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        raise ValueError(f"no images found in {images}")
    models = [m.strip() for m in ns.models.split(",") if m.strip()]
    own_dir = not ns.data_dir
    data_dir = ns.data_dir or tempfile.mkdtemp(prefix="idunno-demo-")
    t0 = time.monotonic()
    console.rule("[bold]IDunno demo")
    console.print(render.plain(f"starting a local cluster: coordinator + hot standby + {ns.workers} workers "
                               f"(data in {data_dir})"))
    cluster = LocalCluster(workers=ns.workers, standby=True, data_dir=data_dir, insecure=ns.insecure or env_insecure(),
                           env={"IDUNNO_PRELOAD_MODELS": ",".join(models)})
    try:
        cluster.start(timeout=60)
        console.print(f"cluster ready in {time.monotonic() - t0:.1f}s: coordinator {cluster.coordinator}, "
                      f"standby {cluster.standby_addr}")
        cfg = cluster.config()
        t1 = time.monotonic()
        with SdfsClient(cfg) as client:
            client.put_many([(str(p), f"data/{p.relative_to(images).as_posix()}") for p in files])
        console.print(f"loaded {len(files)} images into SDFS (replication factor {cfg.replication_factor}) "
                      f"in {time.monotonic() - t1:.2f}s")
        jobs = _submit_jobs(cluster, cfg, models, ns.batch, console)
        cluster.ctl("start")
        live_view(cfg, console, until_done=jobs)
        _show_statistics(cluster, jobs, ns.report, console)
    finally:
        cluster.stop()
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)  # the demo's cluster data is scratch
    console.print(f"cluster stopped; demo took {time.monotonic() - t0:.1f}s")
    return 0


def _submit_jobs(cluster: LocalCluster, cfg: Config, models: list[str], batch: int, console: Console) -> list[str]:
    """One job per model over data/, each with a line saying where its workers get the weights."""
    jobs = []
    with SdfsClient(cfg) as client:
        for model in models:
            job = cluster.ctl("submit", model=model, inputs="data/", batch=batch)
            jobs.append(job["job_id"])
            console.print(render.plain(f"submitted {job['job_id']}: {model} over {job['total']} images, "
                                       f"batch {batch}"))
            # Where its workers get the weights (docs/models.md), and how to get real ones.
            kind, text = weights_source(client, job["model"], job.get("weights") or "")
            console.print(render.plain("  weights: ", (text, "yellow" if kind == "seeded" else "green")))
    return jobs


def _show_statistics(cluster: LocalCluster, jobs: list[str], report: str, console: Console) -> None:
    console.print()
    console.rule("[bold]statistics")
    render.show(console, "query_rate", cluster.ctl("query_rate"))
    render.show(console, "query_time", cluster.ctl("query_time"))
    render.show(console, "completed", cluster.ctl("completed"))
    for job in jobs:
        sample = cluster.ctl("results", job=job, limit=3)
        render.show(console, "results", sample)
    console.print(render.plain("results are in SDFS: " + ", ".join(f"results/{j}" for j in jobs)
                               + "  (read them with `idunno ctl results JOB` or "
                               "`idunno sdfs get results/JOB out.json`)"))
    if report:
        try:
            from cli.report import write_report  # noqa: PLC0415

            path = write_report(cluster.ctl("timeline"), report)
            console.print(render.plain(f"run report written to {os.path.abspath(path)}"))
        except ImportError as exc:
            console.print(render.plain((f"no report: {exc}", "yellow")))
