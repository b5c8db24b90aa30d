"""SDFS commands (put, get, delete, get_versions, ls, store), shared by the worker shell and ``idunno sdfs``."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cli.cmdline import UsageError, convert
from cli.render import plain
from common.commands import Arg
from idunno.client import Sdfs

SDFS_COMMANDS = {
    "put": "put <localfile> <sdfsname>  |  put -r <localdir> <prefix/>: insert or update (new version)",
    "get": "get <sdfsname> <localfile>: fetch the latest version",
    "delete": "delete <sdfsname>: delete every version",
    "get_versions": "get_versions <sdfsname> <k> <localfile>: the last k versions, newest first, in one file",
    "ls": "ls [sdfsname|glob|prefix]: replicas of each version of matching files",
    "store": "store [node-data-addr]: files and versions stored on a node (default: this node / every node)",
}


VERSIONS_ARG = Arg("k", int, lo=1)


def _ts(x: float) -> str:
    return dt.datetime.fromtimestamp(x).strftime("%Y-%m-%d %H:%M:%S")


def run_sdfs(client: Sdfs, console: Console, tokens: list[str], node: str | None = None,
             nodes: list[str] | None = None) -> None:
    """Run one SDFS command through the Python client; raise UsageError / IdunnoError on failure.
    ``node`` / ``nodes``: whose ``store`` to show when the command names none."""
    if not tokens:
        raise UsageError("no command")
    cmd, args = tokens[0], tokens[1:]
    if cmd not in SDFS_COMMANDS:
        raise UsageError(f"unknown command {cmd!r}; commands: {', '.join(SDFS_COMMANDS)}")
    if cmd == "store":
        _store(client, console, args[:1] or ([node] if node else list(nodes or [])))
    else:
        _HANDLERS[cmd](client, console, args)


def _put(client: Sdfs, console: Console, args: list[str]) -> None:
    if args[:1] == ["-r"]:
        _put_tree(client, console, args[1:])
        return
    if len(args) != 2:
        raise UsageError(SDFS_COMMANDS["put"])
    if not os.path.isfile(args[0]):
        raise UsageError(f"local file not found: {args[0]}")
    v = client.put(args[0], args[1])
    console.print(plain(f"put {args[1]} version {v}"))


def _put_tree(client: Sdfs, console: Console, args: list[str]) -> None:
    """``put -r <localdir> <prefix/>``: every file under the directory, in one batch."""
    if len(args) != 2:
        raise UsageError(SDFS_COMMANDS["put"])
    root, prefix = Path(args[0]), args[1]
    if not root.is_dir():
        raise UsageError(f"not a directory: {root}")
    items = [(str(p), prefix + p.relative_to(root).as_posix()) for p in sorted(root.rglob("*")) if p.is_file()]
    if not items:
        raise UsageError(f"no files under {root}")
    versions = client.put_many(items)
    console.print(plain(f"put {len(versions)} files under {prefix}"))


def _get(client: Sdfs, console: Console, args: list[str]) -> None:
    if len(args) != 2:
        raise UsageError(SDFS_COMMANDS["get"])
    v = client.get(args[0], args[1])
    console.print(plain(f"got {args[0]} version {v['version']} ({v['size']} bytes) -> {args[1]}"))


def _delete(client: Sdfs, console: Console, args: list[str]) -> None:
    if len(args) != 1:
        raise UsageError(SDFS_COMMANDS["delete"])
    n = client.delete(args[0])
    console.print(plain(f"deleted {args[0]} ({n} versions)"))


def _get_versions(client: Sdfs, console: Console, args: list[str]) -> None:
    if len(args) != 3:
        raise UsageError(SDFS_COMMANDS["get_versions"])
    k = convert(VERSIONS_ARG, args[1])  # before the client is touched: a bad count never reaches the cluster
    vs = client.get_versions(args[0], k, args[2])
    numbers = ", ".join(str(v["version"]) for v in vs)
    console.print(plain(f"wrote {len(vs)} versions of {args[0]} ({numbers}) -> {args[2]}"))


def _ls(client: Sdfs, console: Console, args: list[str]) -> None:
    if len(args) > 1:
        raise UsageError(SDFS_COMMANDS["ls"])
    files = client.ls(args[0] if args else "")
    if args and not files:
        raise UsageError(f"no SDFS file matches {args[0]!r}")
    t = Table(title=plain(f"sdfs ls {args[0] if args else ''}".strip()))
    for col in ("name", "version", "size", "time", "replicas"):
        t.add_column(col)
    for f in files:
        for v in f["versions"]:
            replicas = ", ".join(r["node_id"] for r in v["replicas"])
            t.add_row(plain(f["name"]), str(v["version"]), str(v["size"]), _ts(v["mtime"]),
                      plain(replicas or ("none alive", "red")))
    console.print(t)


def _store(client: Sdfs, console: Console, targets: list[str]) -> None:
    if not targets:
        raise UsageError("store needs a node data address (host:port)")
    for addr in targets:
        t = Table(title=plain(f"stored on {addr}"))
        for col in ("name", "version", "size", "checksum"):
            t.add_column(col)
        for name, version, size, checksum, _mtime in client.store(addr):
            t.add_row(plain(name), str(version), str(size), plain(str(checksum)[:16]))
        console.print(t)


# Every command but `store` (which also takes the default node list).
_HANDLERS: dict[str, Callable[[Sdfs, Console, list[str]], None]] = {
    "put": _put, "get": _get, "delete": _delete, "get_versions": _get_versions, "ls": _ls,
}
