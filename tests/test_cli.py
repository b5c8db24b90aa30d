"""CLI conventions without a cluster: option placement, help, errors, strict JSON, start-up imports, `down`."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for
from rich.console import Console

from cli.cluster import STATE_FILE, free_port_block, proc_identity
from cli.cmdline import UsageError, help_text, parse_command
from cli.main import build_parser, command_names, normalize_argv
from cli.shell import run_coordinator_line
from idunno import Client, ClusterUnavailable
from idunno.client import dumps, json_safe

REPO = Path(__file__).resolve().parent.parent
COMMANDS = command_names(build_parser())


def test_the_command_list_matches_the_parser():
    from cli.main import COMMAND_NAMES  # noqa: PLC0415

    assert set(COMMAND_NAMES) == COMMANDS
    # Parsing with only the command's sub-parser gives what the whole parser gives.
    argv = ["ctl", "--json", "submit", "m", "in/", "--batch", "2"]
    assert vars(build_parser("ctl").parse_args(argv)) == vars(build_parser().parse_args(argv))


def idunno(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the CLI as a user would: a new interpreter, this tree first on the path."""
    full = dict(os.environ)
    full.pop("IDUNNO_COORDINATOR", None)
    full["PYTHONPATH"] = str(REPO) + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=full,
                          timeout=timeout, cwd=REPO)


def parse(argv: list[str]):
    return build_parser().parse_args(normalize_argv(argv, COMMANDS))


@pytest.mark.parametrize("argv", [
    ["ctl", "results", "job1", "--json"],
    ["ctl", "--json", "results", "job1"],
    ["--json", "ctl", "results", "job1"],
    ["ctl", "results", "--json", "job1"],
])
def test_json_is_accepted_anywhere_on_the_line(argv):
    ns = parse(argv)
    assert ns.json is True and ns.cmd == ["results", "job1"]


def test_global_options_after_the_command_are_not_swallowed():
    ns = parse(["ctl", "submit", "alexnet", "in/", "--batch", "4", "--coordinator", "h:1,h:2", "--data-dir=/x"])
    assert ns.coordinator == "h:1,h:2" and ns.data_dir == "/x"
    assert ns.cmd == ["submit", "alexnet", "in/", "--batch", "4"]
    ns = parse(["--coordinator", "h:1", "sdfs", "ls", "in/", "--node", "n:3"])
    assert (ns.coordinator, ns.node, ns.cmd) == ("h:1", "n:3", ["ls", "in/"])
    ns = parse(["members", "--log-level", "DEBUG", "--json"])
    assert ns.log_level == "DEBUG" and ns.json
    # After `--` nothing is an option any more (an SDFS name may look like one).
    assert parse(["sdfs", "--", "get", "--json", "out"]).cmd == ["get", "--json", "out"]


def test_help_and_shell_show_the_option_forms():
    assert "submit <model> <inputs> [--batch N] [--latency-target S] [--weight W] [--start]" in help_text()
    assert help_text("submit").startswith(
        "usage: submit <model> <inputs> [--batch N] [--latency-target S] [--weight W] [--start]")
    assert "wait <job> [--timeout SECONDS]" in help_text()
    console = Console(record=True, width=200)
    run_coordinator_line("help submit", lambda *a: None, console)
    run_coordinator_line("submit --help", lambda *a: None, console)
    out = console.export_text()
    assert out.count("[--batch N] [--latency-target S] [--weight W] [--start]") == 2
    assert parse_command(["submit", "m", "in/", "--batch", "AUTO", "--latency-target", "0.5"])[1] == {
        "model": "m", "inputs": "in/", "batch": "auto", "latency_target": 0.5}
    assert parse_command(["set_batch_size", "job1", "auto"])[1] == {"job": "job1", "n": "auto"}
    assert parse_command(["submit", "m", "in/", "--batch=3", "--weight", "2", "--start"])[1] == {
        "model": "m", "inputs": "in/", "batch": 3, "weight": 2.0, "start": True}
    with pytest.raises(UsageError, match=r"submit: unknown option --size; usage: submit <model>"):
        parse_command(["submit", "m", "in/", "--size", "3"])
    with pytest.raises(UsageError, match="submit: batch must be a whole number, not 'many'; usage: submit"):
        parse_command(["submit", "m", "in/", "--batch", "many"])


def test_ctl_command_help_flag_and_errors_name_the_command():
    r = idunno("ctl", "submit", "--help")
    assert r.returncode == 0 and "usage: submit <model> <inputs> [--batch N]" in r.stdout
    r = idunno("ctl", "help", "cancel")
    assert r.returncode == 0 and "in-flight ones finish" in r.stdout
    r = idunno("ctl", "results")
    assert r.returncode == 2 and "results: missing job; usage: results <job>" in r.stderr
    r = idunno("ctl", "frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr and "submit" in r.stderr


def test_without_a_cluster_a_command_fails_within_2s_naming_it_and_what_to_do(tmp_path):
    port = free_port_block(size=1)  # nothing listens there (the default 7100 may be someone's cluster)
    t0 = time.monotonic()
    r = idunno("ctl", "members", env={"IDUNNO_DATA_DIR": str(tmp_path), "IDUNNO_COORDINATOR": f"127.0.0.1:{port}"})
    took = time.monotonic() - t0
    assert r.returncode == 1
    assert took < 2.0 + 0.6, took  # the 2 s budget plus this interpreter's start-up on a busy machine
    assert r.stderr.startswith("idunno: error: members: no coordinator answers")
    assert "idunno up" in r.stderr and "--coordinator" in r.stderr


def test_a_client_fails_fast_also_behind_something_that_accepts_any_connection():
    # A listener that accepts TCP and never speaks ZeroMQ (a middlebox, a wrong port).
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(ClusterUnavailable, match=rf"jobs: no coordinator answers .*127.0.0.1:{port}: no greeting"):
            Client(coordinator=f"127.0.0.1:{port}").command("jobs")
        assert time.monotonic() - t0 < 2.0
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        srv.close()


def test_json_output_is_strict():
    data = {"latency": {"avg": math.nan, "p99": math.inf, "count": 0}, "rows": [1.5, -math.inf]}
    assert json_safe(data) == {"latency": {"avg": None, "p99": None, "count": 0}, "rows": [1.5, None]}
    text = dumps(data)

    def refuse(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(text, parse_constant=refuse)["latency"]["avg"] is None


def test_a_cli_call_imports_neither_torch_nor_rich_tables_nor_matplotlib():
    code = ("import sys, cli.main as m; rc = m.main(['ctl', 'jobs', '--json', '--coordinator', '127.0.0.1:9']); "
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'torchvision', 'matplotlib', 'rich', "
            "'prompt_toolkit', 'numpy', 'PIL'}), rc)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
    assert r.stdout.strip() == "[] 1", r.stdout + r.stderr


def test_down_honours_idunno_data_dir(tmp_path):
    # A process recorded as part of a cluster in IDUNNO_DATA_DIR (started here, so we may stop it), with
    # the start time and command line `up` records (`down` signals nothing it cannot verify).
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ident = wait_for(lambda: (i := proc_identity(victim.pid)) and i["cmdline"] == victim.args and i,
                         timeout=10, what="the recorded process's command line in /proc")
        rec = {"role": "worker", "pid": victim.pid, "start": ident["start"], "cmdline": victim.args}
        (tmp_path / STATE_FILE).write_text(json.dumps({"coordinator": "127.0.0.1:9", "standby": "",
                                                       "procs": [rec]}))
        r = idunno("down", env={"IDUNNO_DATA_DIR": str(tmp_path)})
        assert r.returncode == 0 and "stopped 1 processes" in r.stdout, r.stdout + r.stderr
        wait_for(lambda: victim.poll() is not None, timeout=5, what="the recorded process to stop")
        assert victim.returncode == -signal.SIGTERM
        assert not (tmp_path / STATE_FILE).exists()
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_up_rejects_an_unknown_preload_model_before_starting_anything(tmp_path):
    r = idunno("up", "--workers", "1", "--preload", "alexnett", "--detach", "--data-dir", str(tmp_path), timeout=120)
    assert r.returncode == 1 and "unknown model 'alexnett'" in r.stderr and "alexnet" in r.stderr
    assert not (tmp_path / STATE_FILE).exists()
