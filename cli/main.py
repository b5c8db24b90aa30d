"""The ``idunno`` command: daemons, the local cluster launcher, shells and one-shot commands.

Start-up time matters (scripts poll ``idunno ctl``): this module imports only the standard library
and the config; rich, torch, matplotlib and the daemons are imported by the commands that use them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from common.config import Config

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_DATA_DIR = "var"
# Options every cluster command takes; accepted anywhere on the line (before or after the command and
# its arguments): `idunno ctl results job1 --json`, `idunno --coordinator h:p ctl jobs`.
GLOBAL_VALUE_OPTIONS = ("--config", "--coordinator", "--data-dir", "--host", "--log-level")
GLOBAL_FLAG_OPTIONS = ("--json",)
# Commands whose arguments are free text (argparse REMAINDER) and their own options.
REMAINDER_OPTIONS = {"ctl": ((), ()), "sdfs": (("--node",), ())}
INSECURE_HELP = ("no keys: plaintext, and anyone who can reach the ports can join, submit and read "
                 "(default: CURVE keys, made in the data directory on first use)")
INSECURE_WARNING = ("WARNING: --insecure: no encryption, no authentication; "
                    "anyone who can reach the ports owns the cluster")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--config", help="TOML config file (also IDUNNO_CONFIG)")
    g.add_argument("--coordinator", help="coordinator address(es) host:port[,host:port] (primary first)")
    g.add_argument("--data-dir", help="where daemons keep their data and `up` its state "
                                      "(default $IDUNNO_DATA_DIR or ./var)")
    g.add_argument("--host", help="address to bind and advertise (default 127.0.0.1)")
    g.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")
    g.add_argument("--json", action="store_true", help="print strict JSON instead of tables (where there are)")


def data_dir_of(ns: argparse.Namespace) -> str:
    return ns.data_dir or os.environ.get("IDUNNO_DATA_DIR") or DEFAULT_DATA_DIR


def resolve_config(ns: argparse.Namespace, **overrides: Any) -> Config:
    from idunno.client import resolve_config as resolve  # noqa: PLC0415

    return resolve(ns.coordinator, config=ns.config, data_dir=data_dir_of(ns), host=ns.host,
                   log_level=ns.log_level, **overrides)


def normalize_argv(argv: list[str], commands: set[str]) -> list[str]:
    """Move the global options (and a free-text command's own options) to just after the command name,
    where argparse expects them. Everything after ``--`` stays as it is."""
    lead: list[str] = []
    moved: list[str] = []
    i = 0
    while i < len(argv) and argv[i] not in commands:
        if argv[i] in GLOBAL_VALUE_OPTIONS and i + 1 < len(argv):
            moved += argv[i : i + 2]
            i += 2
            continue
        if argv[i] in GLOBAL_FLAG_OPTIONS or argv[i].split("=", 1)[0] in GLOBAL_VALUE_OPTIONS:
            moved.append(argv[i])
        else:
            lead.append(argv[i])
        i += 1
    if i == len(argv):
        return list(argv)
    cmd, rest = argv[i], argv[i + 1 :]
    own_values, own_flags = REMAINDER_OPTIONS.get(cmd, ((), ()))
    values, flags = (*GLOBAL_VALUE_OPTIONS, *own_values), (*GLOBAL_FLAG_OPTIONS, *own_flags)
    kept: list[str] = []
    j = 0
    while j < len(rest):
        tok = rest[j]
        name = tok.split("=", 1)[0]
        if tok == "--":
            kept += rest[j + 1 :] if cmd in REMAINDER_OPTIONS else rest[j:]
            break
        if tok in values and j + 1 < len(rest):
            moved += rest[j : j + 2]
            j += 2
        elif tok in flags or ("=" in tok and name in values):
            moved.append(tok)
            j += 1
        else:
            kept.append(tok)
            j += 1
    return [*lead, cmd, *moved, *kept]


COMMAND_NAMES = ("coordinator", "worker", "up", "down", "members", "ctl", "shell", "sdfs", "logs", "top", "report",
                 "keys", "demo", "models")


def _coordinator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", help="host:port of the control socket (PUB is +1, logs +2)")
    p.add_argument("--peer", help="the other coordinator (primary <-> standby)")
    p.add_argument("--standby", action="store_true", help="start as hot standby of --primary/--peer")
    p.add_argument("--primary", help="alias of --peer for a standby")
    p.add_argument("--scheduler", default="fair-time", choices=["fair-time", "round-robin"])
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this HTTP port")
    p.add_argument("--shell", action=argparse.BooleanOptionalAction, default=None,
                   help="attach the interactive shell (default: when stdin is a terminal)")
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)


def _worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=0, help="SDFS data port; also the node's address")
    p.add_argument("--name", help="the node's stable identity and data directory (<data-dir>/<name>); "
                                  "default worker-<host>-<port>")
    p.add_argument("--torch-threads", type=int)
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)


def _up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--no-standby", action="store_true")
    p.add_argument("--preload", default="", metavar="MODEL,...",
                   help="models every worker loads at start (the first batch then does not wait for them)")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this HTTP port")
    p.add_argument("--detach", action="store_true", help="return once ready; stop later with `idunno down`")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--fresh", action="store_true",
                   help="wipe the cluster state in --data-dir first (SDFS files, jobs); by default `up` "
                        "brings back the same nodes with their data")
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)


def _down_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--purge", action="store_true",
                   help="also delete the cluster's state (SDFS files, jobs, logs) from --data-dir")


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


def _ctl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="command and arguments")


def _sdfs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", help="data address of the node whose `store` to show (worker shell's node)")
    p.add_argument("cmd", nargs=argparse.REMAINDER)


def _logs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", help="only nodes whose name contains this")
    p.add_argument("--level", default="DEBUG")
    p.add_argument("--grep", help="only messages matching this regular expression")
    p.add_argument("--duration", type=float, help="stop after this many seconds")


def _top_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, help="stop after this many seconds")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("jobs", nargs="*", help="job ids (default: every job)")
    p.add_argument("--out", default="report.png")


def _keys_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["init"])
    p.add_argument("--dir", default="keys", help="where to write the keys (then set IDUNNO_CURVE_DIR)")
    p.add_argument("--force", action="store_true")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--images", default="data", help="directory of input images")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--models", default="alexnet,resnet50")
    p.add_argument("--report", default="report.png", help="where to write the run report ('' for none)")
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)


# (name, help, takes the cluster options, adds its own arguments), in `idunno --help` order.
SUBCOMMANDS: tuple[tuple[str, str, bool, Callable[[argparse.ArgumentParser], None]], ...] = (
    ("coordinator", "run a coordinator (primary or hot standby)", True, _coordinator_args),
    ("worker", "run a worker (inference + SDFS storage)", True, _worker_args),
    ("up", "start a local cluster on loopback", True, _up_args),
    ("down", "stop the local cluster started by `idunno up`", True, _down_args),
    ("members", "print the membership table", True, _no_args),
    ("ctl", "run one coordinator command (see `idunno ctl help`)", True, _ctl_args),
    ("shell", "attach the coordinator shell to a running cluster", True, _no_args),
    ("sdfs", "SDFS commands: one-shot with arguments, the worker shell without", True, _sdfs_args),
    ("logs", "stream live logs from every node", True, _logs_args),
    ("top", "live view: members, per-job progress and rates, who runs what", True, _top_args),
    ("report", "write a PNG report of jobs (rates, latency, worker timeline)", True, _report_args),
    ("keys", "`keys init`: create CURVE keys for an authenticated, encrypted cluster", False, _keys_args),
    ("demo", "start a cluster, load data/, run AlexNet and ResNet jobs, print stats", True, _demo_args),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, just that command's sub-parser (enough to parse it):
    building all of them (argparse runs gettext for every parser) is a fair part of a short CLI
    call's start-up."""
    parser = argparse.ArgumentParser(prog="idunno", description="IDunno distributed ML inference")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, cluster_options, add_args in SUBCOMMANDS:
        if only is None or name == only:
            p = subparsers.add_parser(name, help=help_text)
            if cluster_options:
                _common(p)
            add_args(p)
    if only in (None, "models"):
        from cli.models_cmd import add_parser as add_models_parser  # noqa: PLC0415

        add_models_parser(subparsers, _common)
    return parser


def command_names(parser: argparse.ArgumentParser) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def main(argv: list[str] | None = None) -> int:
    argv = normalize_argv(sys.argv[1:] if argv is None else argv, set(COMMAND_NAMES))
    # Only the command's own parser, unless the top level is asked for help or has no command.
    command = next((a for a in argv if a in COMMAND_NAMES), None)
    top_help = command is None or any(a in ("-h", "--help") for a in argv[: argv.index(command)])
    ns = build_parser(None if top_help else command).parse_args(argv)
    try:
        return dispatch(ns)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one-shot commands: a clear message and a non-zero exit
        from common.rpc import RpcError  # noqa: PLC0415
        from idunno.client import IdunnoError  # noqa: PLC0415

        if isinstance(exc, (IdunnoError, RpcError, ValueError, OSError, TimeoutError, RuntimeError)):
            print(f"idunno: error: {exc}", file=sys.stderr)
            return 1
        raise


def plain(*parts: Any) -> Any:
    """:func:`cli.render.plain` (literal text, never markup), importing rich only when something is shown."""
    from cli.render import plain as literal  # noqa: PLC0415

    return literal(*parts)


def make_console() -> Console:
    from rich.console import Console  # noqa: PLC0415 - not imported by calls that print JSON

    # Scripts and pipes get full-width lines instead of tables squeezed to 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=200, soft_wrap=True)


def dispatch(ns: argparse.Namespace) -> int:
    cmd = ns.command
    quiet = cmd in ("coordinator", "worker") or (cmd in ("ctl", "members") and ns.json)
    console: Any = None if quiet else make_console()
    handler = HANDLERS.get(cmd)
    if handler is None:
        raise ValueError(f"unknown command {cmd}")
    return handler(ns, console)


def _cmd_coordinator(ns: argparse.Namespace, console: Console) -> int:
    from cli.daemons import run_coordinator  # noqa: PLC0415

    cfg = resolve_config(ns, metrics_port=ns.metrics_port, role="coordinator", insecure=ns.insecure or None)
    addr = ns.bind or cfg.coordinator
    shell = sys.stdin.isatty() if ns.shell is None else ns.shell
    return run_coordinator(cfg, addr, ns.peer or ns.primary, ns.standby, ns.data_dir, ns.scheduler, shell)


def _cmd_worker(ns: argparse.Namespace, console: Console) -> int:
    from cli.daemons import run_worker  # noqa: PLC0415

    cfg = resolve_config(ns, torch_threads=ns.torch_threads, role="worker", insecure=ns.insecure or None)
    return run_worker(cfg, ns.port, ns.data_dir, ns.name)


def _cmd_down(ns: argparse.Namespace, console: Console) -> int:
    from cli.cluster import stop_from_state  # noqa: PLC0415

    data_dir = data_dir_of(ns)
    if ns.purge:
        from cli.cluster import cluster_entries  # noqa: PLC0415

        cluster_entries(data_dir)  # refuse before stopping anything, not after
    n = stop_from_state(data_dir)
    console.print(plain(f"stopped {n} processes" if n else f"no running cluster found in {data_dir}"))
    if ns.purge:
        from cli.cluster import purge_data_dir  # noqa: PLC0415

        console.print(plain(f"purged {purge_data_dir(data_dir)} entries of cluster state from {data_dir}"))
    return 0


def _cmd_shell(ns: argparse.Namespace, console: Console) -> int:
    from cli.shell import coordinator_shell  # noqa: PLC0415

    return coordinator_shell(resolve_config(ns))


def _cmd_logs(ns: argparse.Namespace, console: Console) -> int:
    from cli.logs import stream_logs  # noqa: PLC0415

    stream_logs(resolve_config(ns), ns.node, ns.level, ns.grep, duration=ns.duration)
    return 0


def _cmd_top(ns: argparse.Namespace, console: Console) -> int:
    from cli.top import live_view  # noqa: PLC0415

    live_view(resolve_config(ns), console, duration=ns.duration)
    return 0


def _cmd_keys(ns: argparse.Namespace, console: Console) -> int:
    from common.security import init_keys  # noqa: PLC0415

    d = init_keys(ns.dir, overwrite=ns.force)
    console.print(plain(f"keys written to {d}; start every node and client with IDUNNO_CURVE_DIR={d.resolve()} "
                        f"(or curve_dir in the config). Coordinator hosts need coordinator.key_secret and "
                        f"grant.key, worker hosts worker.key_secret and grant.key, clients client.key_secret; "
                        f"every host the public *.key files. Add another client's public key to "
                        f"{d / 'authorized'} to admit it."))
    return 0


def _cmd_report(ns: argparse.Namespace, console: Console) -> int:
    from cli.report import write_report  # noqa: PLC0415
    from idunno.client import Client  # noqa: PLC0415

    with Client(cfg=resolve_config(ns)) as client:
        timeline = client.command("timeline")
    if ns.jobs:
        missing = [j for j in ns.jobs if j not in timeline["jobs"]]
        if missing:
            raise ValueError(f"no such job: {', '.join(missing)}")
        timeline["jobs"] = {j: timeline["jobs"][j] for j in ns.jobs}
    console.print(plain(f"report written to {write_report(timeline, ns.out)}"))
    return 0


def _cmd_models(ns: argparse.Namespace, console: Console) -> int:
    from cli.models_cmd import run_models  # noqa: PLC0415

    return run_models(ns, resolve_config(ns), console)


def _cmd_demo(ns: argparse.Namespace, console: Console) -> int:
    from cli.demo import run_demo  # noqa: PLC0415

    return run_demo(ns, console)


def cmd_ctl(ns: argparse.Namespace, console: Console, tokens: list[str]) -> int:
    from cli.cmdline import UsageError, help_text, parse_command, run_command, wants_help  # noqa: PLC0415
    from idunno.client import Client, dumps  # noqa: PLC0415

    try:
        if not tokens or tokens[0] in ("help", "-h", "--help"):
            print(help_text(tokens[1] if len(tokens) > 1 else None))
            return 0 if tokens else 2
        if wants_help(tokens):
            print(help_text(tokens[0]))
            return 0
        name, args = parse_command(tokens)
    except UsageError as exc:
        print(f"idunno: error: {exc}", file=sys.stderr)
        return 2
    with Client(cfg=resolve_config(ns)) as client:
        data = run_command(client, name, args)
    if ns.json:
        print(dumps(data, indent=2))
    else:
        from cli import render  # noqa: PLC0415

        render.show(console, name, data)
    return 0


def cmd_sdfs(ns: argparse.Namespace, console: Console) -> int:
    from cli.cmdline import UsageError  # noqa: PLC0415
    from cli.sdfs_cmds import SDFS_COMMANDS, run_sdfs  # noqa: PLC0415
    from idunno.client import Client  # noqa: PLC0415

    cfg = resolve_config(ns)
    if not ns.cmd:
        from cli.shell import sdfs_shell  # noqa: PLC0415

        return sdfs_shell(cfg, ns.node)
    if ns.cmd[0] in ("help", "-h", "--help") or any(t in ("-h", "--help") for t in ns.cmd[1:]):
        print("\n".join(SDFS_COMMANDS.values()))
        return 0
    with Client(cfg=cfg) as client:
        nodes = None
        if ns.cmd[0] == "store" and not ns.node and len(ns.cmd) == 1:
            members = client.members()
            nodes = [m["data_addr"] for m in members if m["state"] == "alive" and m["data_addr"]]

        class LazySdfs:  # the cluster is contacted only once the arguments are checked (bad ones: exit 2)
            def __getattr__(self, name: str) -> Any:
                return getattr(client.sdfs, name)

        try:
            run_sdfs(LazySdfs(), console, ns.cmd, node=ns.node, nodes=nodes)  # type: ignore[arg-type]
        except UsageError as exc:
            print(f"idunno: error: {exc}", file=sys.stderr)
            return 2
    return 0


def preload_list(spec: str) -> list[str]:
    """``--preload alexnet,resnet50``: checked before anything starts (a typo fails here, with suggestions)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        return []
    from models import is_noop, resolve_name  # noqa: PLC0415 - torchvision: only when preloading

    return [n if is_noop(n) else resolve_name(n) for n in names]


def cmd_up(ns: argparse.Namespace, console: Console) -> int:
    from cli.cluster import LocalCluster, env_insecure  # noqa: PLC0415

    data_dir = data_dir_of(ns)
    if ns.workers < 1:
        raise ValueError("--workers must be >= 1")
    _clear_earlier_cluster(ns, console, data_dir)
    env = {}
    preload = preload_list(ns.preload)
    if preload:
        env["IDUNNO_PRELOAD_MODELS"] = ",".join(preload)
    if ns.insecure or env_insecure():
        print(f"idunno: {INSECURE_WARNING}", file=sys.stderr)
    cluster = LocalCluster(workers=ns.workers, standby=not ns.no_standby, data_dir=data_dir, env=env,
                           metrics_port=ns.metrics_port, insecure=ns.insecure or env_insecure())
    try:
        cluster.start(timeout=ns.timeout)
    except BaseException:
        cluster.stop()
        raise
    _announce_cluster(ns, console, cluster, preload)
    if ns.detach:
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print("running; press Ctrl-C to stop the cluster")
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    cluster.stop()
    console.print("cluster stopped")
    return 0


def _clear_earlier_cluster(ns: argparse.Namespace, console: Console, data_dir: str) -> None:
    """Stop a cluster an earlier `up` left running, wipe its state with --fresh, and say which
    workers come back with their replicas."""
    from cli.cluster import cluster_entries, existing_workers, load_state  # noqa: PLC0415

    if ns.fresh:
        cluster_entries(data_dir)  # refuse (before stopping anything) if the directory is not only ours
    if load_state(data_dir):
        from cli.cluster import stop_from_state  # noqa: PLC0415

        console.print(plain(f"a cluster from an earlier `idunno up` is recorded in {data_dir}; stopping it first"))
        stop_from_state(data_dir)
    if ns.fresh:
        from cli.cluster import purge_data_dir  # noqa: PLC0415

        n = purge_data_dir(data_dir)
        if n:
            console.print(plain(f"--fresh: wiped {n} entries of earlier cluster state from {data_dir}"))
    left = existing_workers(data_dir)
    if left:
        kept = left[: ns.workers]
        console.print(plain(f"resuming from the state in {data_dir}: workers {', '.join(kept)} come back with "
                            f"their replicas (`idunno up --fresh` starts empty)"))
        idle = left[ns.workers:]
        if idle:
            console.print(plain(f"  not started (--workers {ns.workers}): {', '.join(idle)}; their replicas are "
                                f"re-created on the running workers"))


def _announce_cluster(ns: argparse.Namespace, console: Console, cluster: Any, preload: list[str]) -> None:
    coords = ",".join(a for a in (cluster.coordinator, cluster.standby_addr) if a)
    metrics = f", metrics on http://{cluster.host}:{ns.metrics_port}/metrics" if ns.metrics_port else ""
    console.print(plain(f"IDunno cluster up: coordinator {cluster.coordinator}"
                        f"{f', standby {cluster.standby_addr}' if cluster.standby_addr else ''}, {ns.workers} workers"
                        f"{(', preloading ' + ', '.join(preload)) if preload else ''}{metrics}"))
    for p in cluster.procs:
        console.print(plain(f"  {p.role:<12} pid {p.popen.pid:<8} {p.addr}   log {p.log_path}"))
    console.print(plain(f"attach a shell: idunno shell        (or: idunno shell --coordinator {coords})"))
    console.print("SDFS shell:     idunno sdfs         logs: idunno logs         stop: idunno down")


# One handler per command, each taking the parsed line and the console (None for daemons and --json).
HANDLERS: dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "coordinator": _cmd_coordinator,
    "worker": _cmd_worker,
    "up": cmd_up,
    "down": _cmd_down,
    "members": lambda ns, console: cmd_ctl(ns, console, ["members"]),
    "ctl": lambda ns, console: cmd_ctl(ns, console, ns.cmd),
    "shell": _cmd_shell,
    "sdfs": cmd_sdfs,
    "logs": _cmd_logs,
    "top": _cmd_top,
    "keys": _cmd_keys,
    "report": _cmd_report,
    "models": _cmd_models,
    "demo": _cmd_demo,
}


if __name__ == "__main__":
    sys.exit(main())
