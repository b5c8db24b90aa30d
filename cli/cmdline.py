"""Parse a coordinator command line (shell or ``idunno ctl``) against the shared command table."""

from __future__ import annotations

from typing import Any

from common.commands import AUTO, CLIENT_COMMANDS, CLIENT_ONLY, COMMANDS, Arg, CommandSpec

HELP_FLAGS = ("-h", "--help")
BOOL_WORDS = ("1", "0", "true", "false", "yes", "no", "on", "off")


class UsageError(ValueError):
    pass


def spec_of(name: str) -> CommandSpec | None:
    return COMMANDS.get(name) or CLIENT_COMMANDS.get(name)


def known_commands() -> list[str]:
    return sorted([*COMMANDS, *CLIENT_COMMANDS, *CLIENT_ONLY])


def _convert(kind: type, raw: str, name: str) -> Any:
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--{name} must be true or false, not {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        what = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
        raise UsageError(f"{name} must be {what}, not {raw!r:.40}") from None


def convert(arg: Arg, raw: str) -> Any:
    """A command-line word as ``arg``'s type, range-checked (UsageError with a clear message)."""
    try:
        if arg.auto and raw.strip().lower() == AUTO:
            return AUTO
        return arg.check(_convert(arg.kind, raw, arg.name))
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def wants_help(tokens: list[str]) -> bool:
    """``submit --help``, ``submit -h``: describe the command instead of running it."""
    return any(t in HELP_FLAGS for t in tokens[1:])


def parse_command(tokens: list[str]) -> tuple[str, dict[str, Any]]:
    if not tokens:
        raise UsageError("no command given; `help` lists the commands")
    name, rest = tokens[0], tokens[1:]
    spec = spec_of(name)
    if spec is None:
        raise UsageError(f"unknown command {name!r}; commands: {', '.join(known_commands())}")
    by_name = {a.name: a for a in spec.args}
    args: dict[str, Any] = {}

    def value(arg: Arg, raw: str) -> Any:
        try:
            return convert(arg, raw)
        except UsageError as exc:
            raise UsageError(f"{name}: {exc}; usage: {spec.usage()}") from None

    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--") and len(tok) > 2:
            key, eq, raw = tok[2:].partition("=")
            key = key.replace("-", "_")
            arg = by_name.get(key)
            if arg is None:
                raise UsageError(f"{name}: unknown option --{key}; usage: {spec.usage()}")
            if eq:
                args[key] = value(arg, raw)
                i += 1
                continue
            if arg.kind is bool and (i + 1 >= len(rest) or rest[i + 1].lower() not in BOOL_WORDS):
                args[key] = True
                i += 1
                continue
            if i + 1 >= len(rest):
                raise UsageError(f"{name}: --{key} needs a value; usage: {spec.usage()}")
            args[key] = value(arg, rest[i + 1])
            i += 2
            continue
        # Positional: the arguments in their declared order (options too, as older scripts wrote them).
        free = [a for a in spec.args if a.name not in args]
        if not free:
            raise UsageError(f"{name}: too many arguments ({tok!r}); usage: {spec.usage()}")
        args[free[0].name] = value(free[0], tok)
        i += 1
    missing = [a.name for a in spec.args if a.required and a.name not in args]
    if missing:
        raise UsageError(f"{name}: missing {', '.join(missing)}; usage: {spec.usage()}")
    return name, args


def help_text(name: str | None = None) -> str:
    if name:
        spec = spec_of(name)
        if spec is None:
            if name in CLIENT_ONLY:
                return CLIENT_ONLY[name]
            raise UsageError(f"unknown command {name!r}; commands: {', '.join(known_commands())}")
        lines = [f"usage: {spec.usage()}", f"  {spec.help}"]
        for a in spec.args:
            shown = a.usage().strip("[]")
            lines.append(f"  {shown:<22} {a.help or a.kind.__name__}{'' if a.required else ' (optional)'}")
        return "\n".join(lines)
    specs = [*COMMANDS.values(), *CLIENT_COMMANDS.values()]
    width = max(len(s.usage()) for s in specs) + 2
    rows = [f"  {s.usage():<{width}} {s.help}" for s in specs]
    rows += [f"  {k:<{width}} {v}" for k, v in CLIENT_ONLY.items()]
    return "commands (`help <command>` for details):\n" + "\n".join(rows)


def run_command(client: Any, name: str, args: dict[str, Any]) -> Any:
    """Run one parsed command through an ``idunno.Client``: the coordinator's commands and the client's
    own (``wait``). The CLI and the shell both come here."""
    if name == "wait":
        return client.job(args["job"]).wait(timeout=args.get("timeout") or None)
    return client.command(name, **args)
