"""Interactive shells (prompt_toolkit): the coordinator shell and the worker's SDFS shell.

Both autocomplete command names and their arguments (job ids, model names, SDFS names, local
paths), keep a history file, offer ``help [command]``, and never exit on an error.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, InMemoryHistory
from rich.console import Console

from cli import render
from cli.cmdline import UsageError, help_text, known_commands, parse_command, run_command, spec_of, wants_help
from cli.sdfs_cmds import SDFS_COMMANDS, run_sdfs
from common.config import Config
from common.rpc import RpcError
from idunno.client import Client, IdunnoError

COMMON_MODELS = ["alexnet", "resnet50", "resnet18", "mobilenet_v3_small", "mobilenet_v3_large", "vgg16",
                 "efficientnet_b0", "squeezenet1_0", "densenet121", "shufflenet_v2_x1_0"]


class _Cached:
    """A list fetched from the cluster at most once per ``ttl`` seconds (completion must stay snappy)."""

    def __init__(self, fetch: Callable[[], list[str]], ttl: float = 3.0) -> None:
        self.fetch, self.ttl, self.at, self.value = fetch, ttl, -1e9, []

    def get(self) -> list[str]:
        if time.monotonic() - self.at > self.ttl:
            try:
                self.value = self.fetch()
            except Exception:
                pass  # completion is best effort
            self.at = time.monotonic()
        return self.value


class CommandCompleter(Completer):
    def __init__(self, commands: Iterable[str], arg_values: Callable[[str, int], list[str] | None]) -> None:
        self.commands = sorted(commands)
        self.arg_values = arg_values
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: Any):
        text = document.text_before_cursor
        words = text.split()
        if not words or (len(words) == 1 and not text.endswith(" ")):
            prefix = words[0] if words else ""
            for c in self.commands:
                if c.startswith(prefix):
                    yield Completion(c, -len(prefix))
            return
        index = len(words) - 1 if not text.endswith(" ") else len(words)
        current = "" if text.endswith(" ") else words[-1]
        values = self.arg_values(words[0], index)
        if values is None:  # a local path argument
            yield from self.paths.get_completions(Document(current, len(current)), complete_event)
            return
        for v in values:
            if v.startswith(current):
                yield Completion(v, -len(current))


def _session(name: str, completer: Completer, history_dir: Path | None, **kw: Any) -> PromptSession:
    history = InMemoryHistory()
    if history_dir is not None:
        history_dir.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(history_dir / f"{name}.history"))
    return PromptSession(history=history, completer=completer, complete_while_typing=True, **kw)


def coordinator_shell(cfg: Config, console: Console | None = None, history_dir: Path | None = None,
                      **session_kw: Any) -> int:
    console = console or Console()
    client = Client(cfg=cfg)

    def call(name: str, args: dict[str, Any]) -> Any:
        return run_command(client, name, args)

    jobs = _Cached(lambda: [j["job_id"] for j in call("jobs", {})])

    def arg_values(cmd: str, index: int) -> list[str] | None:
        spec = spec_of(cmd)
        if cmd == "help":
            return known_commands()
        if spec is None or index - 1 >= len(spec.args):
            return []
        arg = spec.args[index - 1]
        if arg.name == "job":
            return jobs.get()
        if arg.name == "model":
            return COMMON_MODELS
        return []

    session = _session("coordinator", CommandCompleter(known_commands(), arg_values), history_dir,
                       **session_kw)
    console.print("IDunno coordinator shell. `help` lists commands, Tab completes, `quit` leaves.")
    try:
        while True:
            try:
                line = session.prompt("idunno> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if not run_coordinator_line(line, call, console):
                break
    finally:
        client.close()
    return 0


def run_coordinator_line(line: str, call: Callable[[str, dict[str, Any]], Any], console: Console) -> bool:
    """Run one shell line; return False to leave. Errors are printed, never raised."""
    try:
        tokens = shlex.split(line)
    except ValueError as exc:
        render.error(console, exc)
        return True
    if not tokens:
        return True
    if tokens[0] in ("quit", "exit"):
        return False
    try:
        if tokens[0] == "help":
            console.print(render.plain(help_text(tokens[1] if len(tokens) > 1 else None)))
            return True
        if wants_help(tokens):
            console.print(render.plain(help_text(tokens[0])))
            return True
        name, args = parse_command(tokens)
        render.show(console, name, call(name, args))
    except UsageError as exc:
        render.error(console, exc)
        console.print(render.plain(help_text(tokens[0]) if spec_of(tokens[0]) else help_text()))
    except (IdunnoError, RpcError) as exc:
        render.error(console, exc)
    except KeyboardInterrupt:  # Ctrl-C during a long command (`wait`): back to the prompt
        console.print("interrupted")
    return True


def sdfs_shell(cfg: Config, node: str | None, console: Console | None = None, history_dir: Path | None = None,
               **session_kw: Any) -> int:
    console = console or Console()
    client = Client(cfg=cfg)
    names = _Cached(lambda: [f["name"] for f in client.sdfs.ls("")])

    def arg_values(cmd: str, index: int) -> list[str] | None:
        if cmd == "help":
            return list(SDFS_COMMANDS)
        sdfs_arg = {"get": {1}, "delete": {1}, "get_versions": {1}, "ls": {1}, "put": {2}}.get(cmd, set())
        if index in sdfs_arg:
            return names.get()
        if cmd == "store":
            return []
        return None

    session = _session("sdfs", CommandCompleter([*SDFS_COMMANDS, "help", "quit"], arg_values), history_dir,
                       **session_kw)
    where = f" on {node}" if node else ""
    console.print(render.plain(f"IDunno SDFS shell{where}. `help` lists commands, `quit` leaves."))
    try:
        while True:
            try:
                line = session.prompt("sdfs> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            try:
                tokens = shlex.split(line)
            except ValueError as exc:
                render.error(console, exc)
                continue
            if not tokens:
                continue
            if tokens[0] in ("quit", "exit"):
                break
            if tokens[0] == "help":
                console.print(render.plain("\n".join(SDFS_COMMANDS.values())))
                continue
            try:
                run_sdfs(client.sdfs, console, tokens, node=node)
            except (UsageError, IdunnoError, RpcError, OSError) as exc:
                render.error(console, exc)
    finally:
        client.close()
    return 0
