"""Model memory budget: peak RSS of a worker's model cache serving six models in turn.

Each configuration runs in its own process (a clean peak RSS, VmHWM): six torchvision models (one
over 500 MB) are each acquired through :class:`models.ModelCache` (what the worker's compute stage
uses) and classify one image, twice round. Baseline (same run): no budget, every model stays loaded.
With a budget the cache evicts the least recently used model; the table shows what that costs in
loads and time and saves in memory.

    .venv/bin/python bench/models.py [--budget-mb 700] [--models a,b,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchlib import headline, images, ratio, table, vm_hwm_kib

MODELS = "vgg11,resnet50,alexnet,resnet18,mobilenet_v3_small,mnasnet0_5"  # vgg11: 507 MB
MB = 1024 * 1024


def child(budget_mb: int, names: list[str]) -> dict:
    import torch  # noqa: PLC0415

    import models  # noqa: PLC0415
    from models import ModelCache  # noqa: PLC0415

    torch.set_num_threads(1)
    img = models.decode_image(images()[0].read_bytes())
    cache = ModelCache(budget_mb * MB if budget_mb else 1 << 62)
    most = 0
    t0 = time.perf_counter()
    for _ in range(2):
        for n in names:
            clf = cache.get((n, "seeded"), (n, ""), n, lambda n=n: models.Classifier(n))
            clf.predict(img)
            most = max(most, cache.used)
    elapsed = time.perf_counter() - t0
    kib = vm_hwm_kib(os.getpid()) or 0
    return {"peak_rss_mb": kib / 1024, "models_mb_max": most / MB, "loads": cache.loads,
            "evictions": cache.evictions, "seconds": elapsed, "resident": cache.names()}


def run(budget_mb: int, names: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(budget_mb), "--models", ",".join(names)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mb", type=int, default=700)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    names = [m.strip() for m in ns.models.split(",") if m.strip()]
    if ns.child is not None:
        print(json.dumps(child(ns.child, names)))
        return 0
    import models  # noqa: PLC0415

    sizes = {n: models.model_nbytes(n) / MB for n in names}
    headline(f"model memory budget: {len(names)} models ({sum(sizes.values()):.0f} MB of weights in all), "
             f"each used twice in turn")
    base = run(0, names)
    budget = run(ns.budget_mb, names)
    rows = []
    for label, r in (("no budget (baseline)", base), (f"model_memory_mb = {ns.budget_mb}", budget)):
        rows.append([label, f"{r['models_mb_max']:.0f}", f"{r['peak_rss_mb']:.0f}",
                     ratio(r["peak_rss_mb"] / base["peak_rss_mb"]), r["loads"], r["evictions"],
                     f"{r['seconds']:.1f}", ", ".join(r["resident"])])
    table("peak memory", ["configuration", "models MB (max)", "peak RSS MB", "vs baseline", "loads",
                                        "evictions", "seconds", "resident at the end"], rows,
          caption="sizes: " + ", ".join(f"{n} {s:.0f} MB" for n, s in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
