"""``idunno models``: real weights for the cluster's models (docs/models.md).

- ``models pull NAME``: download torchvision's DEFAULT checkpoint from its published URL (or the
  ``weights_mirror``, or ``--url``), check the sha256 prefix in its file name as torch.hub does,
  check it loads for NAME, and store it in SDFS as ``models/NAME.pth``, where workers find it.
- ``models put FILE NAME``: the same from a local file (for an offline cluster).
- ``models ls``: which models have real weights in SDFS, which this machine's hub cache has, and
  which workers have each model loaded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from common.config import Config

MB = 1024 * 1024


def add_parser(sub: Any, common: Any) -> None:
    """Register ``models`` with its actions on the ``idunno`` parser (``common`` adds the cluster options)."""
    p = sub.add_parser("models", help="real weights for the models: `models pull NAME`, `models put FILE NAME`, "
                                      "`models ls`")
    common(p)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    # The cluster options belong to `models` itself (argv normalisation puts them there): an action's
    # sub-parser with the same options would reset them to their defaults.
    a = actions.add_parser("pull", help="download a model's published torchvision weights into SDFS (online)")
    a.add_argument("name", help="torchvision classifier, e.g. alexnet, resnet50")
    a.add_argument("--url", help="download from this URL instead (a sha256 prefix in its file name is checked)")
    a.add_argument("--sdfs-name", help="store under this SDFS name (for `submit --weights`) instead of "
                                       "models/NAME.pth")
    a = actions.add_parser("put", help="store a local checkpoint as a model's weights in SDFS (offline)")
    a.add_argument("file", help="a state_dict (.pth) for the model")
    a.add_argument("name", help="torchvision classifier the weights are for")
    a.add_argument("--sdfs-name", help="store under this SDFS name (for `submit --weights`) instead of "
                                       "models/NAME.pth")
    a = actions.add_parser("ls", help="models with weights in SDFS or this machine's hub cache, and who loaded them")
    a.add_argument("--all", action="store_true", help="every torchvision classifier, not only those with weights")


def sdfs_name_of(model: str) -> str:
    return f"models/{model}.pth"  # the worker's side: worker/executor.py weights_sdfs_name


def run_models(ns: argparse.Namespace, cfg: Config, console: Any) -> int:
    from cli.render import plain  # noqa: PLC0415

    if ns.action == "ls":
        return models_ls(cfg, console, ns.all, ns.json)
    done = pull(cfg, ns.name, ns.url, ns.sdfs_name) if ns.action == "pull" else put(cfg, ns.file, ns.name, ns.sdfs_name)
    console.print(plain(done))
    return 0


def _upload(cfg: Config, path: str, sdfs_name: str) -> int:
    from idunno.client import Client  # noqa: PLC0415

    with Client(cfg=cfg) as client:
        return client.sdfs.put(path, sdfs_name)


def put(cfg: Config, file: str, name: str, sdfs_name: str | None = None) -> str:
    """Check ``file`` loads as ``name``'s weights, then store it in SDFS; return what was done."""
    import models  # noqa: PLC0415 - torch: only for model commands

    resolved = models.resolve_name(name)
    if not os.path.isfile(file):
        raise ValueError(f"no such file: {file}")
    info = models.validate(resolved, file)  # ValueError with the reason: nothing is uploaded
    target = sdfs_name or sdfs_name_of(resolved)
    version = _upload(cfg, file, target)
    return (f"stored {file} as {target} version {version} ({info.tensors} tensors, {info.nbytes / MB:.1f} MB): "
            f"workers use it for {resolved} from their next batch" if not sdfs_name else
            f"stored {file} as {target} version {version}: run jobs with it by `submit {resolved} INPUTS "
            f"--weights {target}`")


def pull(cfg: Config, name: str, url: str | None = None, sdfs_name: str | None = None) -> str:
    """Download ``name``'s published weights (hash checked), check them, store them in SDFS."""
    import models  # noqa: PLC0415

    resolved = models.resolve_name(name)
    url = url or models.default_url(resolved, cfg.weights_mirror)
    filename = os.path.basename(urllib.parse.urlparse(url).path) or f"{resolved}.pth"
    with tempfile.TemporaryDirectory(prefix="idunno-pull-") as tmp:
        dest = Path(tmp) / filename
        try:
            sha = models.download(url, dest, cfg.download_timeout)
        except models.WeightsDownloadError as exc:
            raise RuntimeError(
                f"{exc} (is this machine offline?). Fetch {url} on a machine that is online and store it with: "
                f"idunno models put FILE {resolved}"
            ) from None
        except models.WeightsHashError as exc:
            raise ValueError(f"refused, nothing stored: {exc}") from None
        checked = "sha256 " + sha[:16] + ("" if models.hash_prefix(url) else " (no hash in the file name to check)")
        text = put(cfg, str(dest), resolved, sdfs_name)
    return f"downloaded {url} ({checked}); {text}"


def weights_source(sdfs: Any, model: str, pinned: str = "") -> tuple[str, str]:
    """Where a job's workers get ``model``'s weights, in their order: (kind, description).

    ``kind`` is ``sdfs``, ``hub-cache`` or ``seeded``. The hub cache is this machine's (right for
    a local cluster; each worker looks in its own). ``sdfs`` is an :class:`idunno.client.Sdfs`.
    """
    import models  # noqa: PLC0415
    from models import registry  # noqa: PLC0415

    resolved = models.resolve_name(model)
    target = pinned or sdfs_name_of(resolved)
    found = sdfs.ls(target)
    versions = next((f["versions"] for f in found if f["name"] == target), [])
    if versions:
        v = versions[0]
        return "sdfs", f"SDFS checkpoint {target} v{v['version']} ({v['size'] / MB:.1f} MB)"
    if pinned:
        return "missing", f"pinned checkpoint {pinned} is not in SDFS"
    hub = registry.hub_cache_path(registry.default_weights(resolved))
    if os.path.isfile(hub):
        return "hub-cache", f"hub cache {hub}"
    return "seeded", (f"seeded random weights, predictions are not meaningful; for real ones run "
                      f"`idunno models pull {resolved}` (online) or `idunno models put FILE {resolved}`")


def models_ls(cfg: Config, console: Any, every: bool = False, as_json: bool = False) -> int:
    import models  # noqa: PLC0415
    from idunno.client import Client, dumps  # noqa: PLC0415
    from models import registry  # noqa: PLC0415

    with Client(cfg=cfg) as client:
        files = client.sdfs.ls("models/")
        vm = client.command("vm_info")
    in_sdfs: dict[str, dict[str, Any]] = {}
    for f in files:
        stem = f["name"].removeprefix("models/").removesuffix(".pth")
        if f["name"] == sdfs_name_of(stem) and f["versions"]:
            in_sdfs[stem] = f["versions"][0]
    loaded: dict[str, list[str]] = {}
    for node, info in vm.items():
        for m in info.get("models", []):
            loaded.setdefault(m, []).append(node)
    names = models.list_models()
    hub = {n: registry.hub_cache_path(registry.default_weights(n)) for n in names}
    hub = {n: p for n, p in hub.items() if os.path.isfile(p)}
    shown = names if every else sorted(set(in_sdfs) | set(loaded) | set(hub))
    rows = []
    for n in shown:
        v = in_sdfs.get(n)
        rows.append({
            "model": n,
            "sdfs": None if v is None else {"name": sdfs_name_of(n), "version": v["version"], "size": v["size"],
                                            "mtime": v["mtime"]},
            "hub_cache": hub.get(n),
            "weights": "sdfs" if v is not None else "hub-cache" if n in hub else "seeded",
            "loaded_on": sorted(loaded.get(n, [])),
        })
    if as_json:
        print(dumps(rows, indent=2))
        return 0
    from rich.table import Table  # noqa: PLC0415

    from cli.render import plain  # noqa: PLC0415

    t = Table(title="models")
    for col in ("model", "weights", "in SDFS", "hub cache (this machine)", "loaded on"):
        t.add_column(col)
    for r in rows:
        s = r["sdfs"]
        sdfs_text = "-" if s is None else (f"v{s['version']}, {s['size'] / MB:.1f} MB, "
                                           f"{dt.datetime.fromtimestamp(s['mtime']):%Y-%m-%d %H:%M}")
        kind = plain((r["weights"], "yellow")) if r["weights"] == "seeded" else plain(r["weights"])
        t.add_row(plain(r["model"]), kind, plain(sdfs_text), plain("yes" if r["hub_cache"] else "-"),
                  plain(", ".join(r["loaded_on"]) or "-"))
    console.print(t)
    if not rows:
        console.print(plain("no model has real weights yet: `idunno models pull NAME` (online) or "
                            "`idunno models put FILE NAME`; `models ls --all` lists every model"))
    return 0
