"""SDFS commands (put, get, delete, get_versions, ls, store), shared by the worker shell and ``idunno sdfs``."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.cmdline import UsageError
from idunno.client import Sdfs

SDFS_COMMANDS = {
    "put": "put <localfile> <sdfsname>  |  put -r <localdir> <prefix/>: insert or update (new version)",
    "get": "get <sdfsname> <localfile>: fetch the latest version",
    "delete": "delete <sdfsname>: delete every version",
    "get_versions": "get_versions <sdfsname> <k> <localfile>: the last k versions, newest first, in one file",
    "ls": "ls [sdfsname|glob|prefix]: replicas of each version of matching files",
    "store": "store [node-data-addr]: files and versions stored on a node (default: this node / every node)",
}


def _ts(x: float) -> str:
    return dt.datetime.fromtimestamp(x).strftime("%Y-%m-%d %H:%M:%S")


def run_sdfs(client: Sdfs, console: Console, tokens: list[str], node: str | None = None,
             nodes: list[str] | None = None) -> None:
    """Run one SDFS command through the Python client; raise UsageError / IdunnoError on failure."""
    if not tokens:
        raise UsageError("no command")
    cmd, args = tokens[0], tokens[1:]
    if cmd not in SDFS_COMMANDS:
        raise UsageError(f"unknown command {cmd!r}; commands: {', '.join(SDFS_COMMANDS)}")
    if cmd == "put":
        if args[:1] == ["-r"]:
            if len(args) != 3:
                raise UsageError(SDFS_COMMANDS["put"])
            root = Path(args[1])
            if not root.is_dir():
                raise UsageError(f"not a directory: {root}")
            prefix = args[2]
            items = [(str(p), prefix + p.relative_to(root).as_posix()) for p in sorted(root.rglob("*")) if p.is_file()]
            if not items:
                raise UsageError(f"no files under {root}")
            versions = client.put_many(items)
            console.print(f"put {len(versions)} files under {escape(prefix)}")
            return
        if len(args) != 2:
            raise UsageError(SDFS_COMMANDS["put"])
        if not os.path.isfile(args[0]):
            raise UsageError(f"local file not found: {args[0]}")
        v = client.put(args[0], args[1])
        console.print(f"put {escape(args[1])} version {v}")
    elif cmd == "get":
        if len(args) != 2:
            raise UsageError(SDFS_COMMANDS["get"])
        v = client.get(args[0], args[1])
        console.print(f"got {escape(args[0])} version {v['version']} ({v['size']} bytes) -> {escape(args[1])}")
    elif cmd == "delete":
        if len(args) != 1:
            raise UsageError(SDFS_COMMANDS["delete"])
        n = client.delete(args[0])
        console.print(f"deleted {escape(args[0])} ({n} versions)")
    elif cmd == "get_versions":
        if len(args) != 3 or not args[1].isdigit():
            raise UsageError(SDFS_COMMANDS["get_versions"])
        vs = client.get_versions(args[0], int(args[1]), args[2])
        numbers = ", ".join(str(v["version"]) for v in vs)
        console.print(f"wrote {len(vs)} versions of {escape(args[0])} ({numbers}) -> {escape(args[2])}")
    elif cmd == "ls":
        if len(args) > 1:
            raise UsageError(SDFS_COMMANDS["ls"])
        files = client.ls(args[0] if args else "")
        if args and not files:
            raise UsageError(f"no SDFS file matches {args[0]!r}")
        t = Table(title=escape(f"sdfs ls {args[0] if args else ''}".strip()))
        for col in ("name", "version", "size", "time", "replicas"):
            t.add_column(col)
        for f in files:
            for v in f["versions"]:
                t.add_row(escape(f["name"]), str(v["version"]), str(v["size"]), _ts(v["mtime"]),
                          ", ".join(r["node_id"] for r in v["replicas"]) or "[red]none alive[/]")
        console.print(t)
    elif cmd == "store":
        targets = args[:1] or ([node] if node else list(nodes or []))
        if not targets:
            raise UsageError("store needs a node data address (host:port)")
        for addr in targets:
            t = Table(title=f"stored on {escape(addr)}")
            for col in ("name", "version", "size", "checksum"):
                t.add_column(col)
            for name, version, size, checksum, _mtime in client.store(addr):
                t.add_row(escape(name), str(version), str(size), checksum[:16])
            console.print(t)
