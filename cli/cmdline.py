"""Parse a coordinator command line (shell or ``idunno ctl``) against the shared command table."""

from __future__ import annotations

from typing import Any

from common.commands import CLIENT_ONLY, COMMANDS, Arg


class UsageError(ValueError):
    pass


def _convert(kind: type, raw: str, name: str) -> Any:
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{name} must be true or false, not {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise UsageError(f"{name} must be {kind.__name__}, not {raw!r:.40}") from None


def convert(arg: Arg, raw: str) -> Any:
    """A command-line word as ``arg``'s type, range-checked (UsageError with a clear message)."""
    try:
        return arg.check(_convert(arg.kind, raw, arg.name))
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_command(tokens: list[str]) -> tuple[str, dict[str, Any]]:
    if not tokens:
        raise UsageError("no command given")
    name, rest = tokens[0], tokens[1:]
    spec = COMMANDS.get(name)
    if spec is None:
        known = sorted([*COMMANDS, *CLIENT_ONLY])
        raise UsageError(f"unknown command {name!r}; commands: {', '.join(known)}")
    by_name = {a.name: a for a in spec.args}
    args: dict[str, Any] = {}
    positional = [a for a in spec.args]
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--"):
            key = tok[2:].replace("-", "_")
            arg = by_name.get(key)
            if arg is None:
                raise UsageError(f"{name}: unknown option {tok}; usage: {spec.usage()}")
            if arg.kind is bool and (i + 1 >= len(rest) or rest[i + 1].startswith("--")):
                args[key] = True
                i += 1
                continue
            if i + 1 >= len(rest):
                raise UsageError(f"{name}: {tok} needs a value; usage: {spec.usage()}")
            args[key] = convert(arg, rest[i + 1])
            i += 2
            continue
        free = [a for a in positional if a.name not in args]
        if not free:
            raise UsageError(f"{name}: too many arguments; usage: {spec.usage()}")
        args[free[0].name] = convert(free[0], tok)
        i += 1
    missing = [a.name for a in spec.args if a.required and a.name not in args]
    if missing:
        raise UsageError(f"{name}: missing {', '.join(missing)}; usage: {spec.usage()}")
    return name, args


def help_text(name: str | None = None) -> str:
    if name:
        spec = COMMANDS.get(name)
        if spec is None:
            if name in CLIENT_ONLY:
                return CLIENT_ONLY[name]
            raise UsageError(f"unknown command {name!r}")
        lines = [f"{spec.usage()}  —  {spec.help}"]
        lines += [f"    {a.name}: {a.help or a.kind.__name__}{'' if a.required else ' (optional)'}" for a in spec.args]
        return "\n".join(lines)
    rows = [f"  {s.usage():<40} {s.help}" for s in COMMANDS.values()]
    rows += [f"  {k:<40} {v}" for k, v in CLIENT_ONLY.items()]
    return "commands:\n" + "\n".join(rows)
