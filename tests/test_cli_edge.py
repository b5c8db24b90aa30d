"""Issue #13 at the command-line edge: hostile numbers get a clear error, never a traceback."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for
from rich.console import Console

from cli import main as cli_main
from cli.cluster import LocalCluster, Proc, ctl, proc_identity, stop_from_state
from cli.shell import run_coordinator_line
from common.config import Config
from common.protocol import Command

HUGE = "9" * 30  # beyond any wire integer
NOWHERE = "127.0.0.1:9"  # nothing is contacted: every case must fail before the network

# --------------------------------------------------------------------------------------------
# finding 9


@pytest.mark.parametrize(("argv", "message"), [
    (["submit", "alexnet", "in/", "--batch", HUGE], "batch must be at most"),
    (["submit", "alexnet", "in/", "--batch", "0"], "batch must be at least 1"),
    (["submit", "alexnet", "in/", "--weight", "0"], "weight must be at least 0.001"),
    (["submit", "alexnet", "in/", "--weight", "nan"], "weight must be a finite number"),
    (["submit", "alexnet", "in/", "--weight", "1e400"], "weight must be a finite number"),
    (["set_batch_size", "job1-alexnet", HUGE], "n must be at most"),
    (["set_batch_size", "job1-alexnet", "-1"], "n must be at least 1"),
    (["results", "job1-alexnet", "--limit", HUGE], "limit must be at most"),
])
def test_ctl_refuses_out_of_range_numbers_with_a_clear_error(argv, message, capsys):
    code = cli_main.main(["ctl", "--coordinator", NOWHERE, *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("k", [HUGE, "0", "-2", "²"])
def test_sdfs_get_versions_refuses_a_bad_count(k, capsys, tmp_path):
    code = cli_main.main(["sdfs", "--coordinator", NOWHERE, "get_versions", "a/b", k, str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "k must be" in err and "Traceback" not in err


def test_library_ctl_and_the_shell_check_numbers_before_sending():
    with pytest.raises(ValueError, match="batch must be at most"):
        ctl(Config(coordinator=NOWHERE), "submit", model="alexnet", inputs="in/", batch=10**30)
    out = io.StringIO()
    sent = []

    def wire(name, args):  # what the shell's RPC does first: encode the command
        sent.append(Command(0, name, args).encode())
        return {}

    assert run_coordinator_line(f"set_batch_size job1 {HUGE}", wire, Console(file=out)) is True
    assert not sent and "n must be at most" in out.getvalue()


# --------------------------------------------------------------------------------------------
# finding 11: `idunno down` signals only the processes `idunno up` started


@pytest.fixture
def bystander():
    """An unrelated process (here: a sleep) that may own a pid listed in a stale cluster.json."""
    p = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
    yield p
    p.kill()
    p.wait(timeout=10)


def write_state(data_dir: Path, procs: list[dict]) -> None:
    (data_dir / "cluster.json").write_text(json.dumps({"coordinator": NOWHERE, "standby": "", "procs": procs}))


@pytest.mark.slow
def test_down_does_not_kill_a_process_that_reused_a_listed_pid(bystander, tmp_path, capsys):
    # Right after spawn /proc may show no arguments yet (mid-exec): wait until it shows the program.
    ident = wait_for(lambda: (i := proc_identity(bystander.pid)) and i["cmdline"] == ["sleep", "300"] and i,
                     timeout=10, what="the bystander's command line in /proc")
    worker_cmd = [sys.executable, "-m", "cli.main", "worker", "--port", "1"]
    write_state(tmp_path, [
        # the recorded worker exited and the sleep got its pid: same pid, another start and command
        {"role": "worker", "pid": bystander.pid, "addr": "", "start": ident["start"] - 7, "cmdline": worker_cmd},
        # same start time but another command line (a forged or corrupted record)
        {"role": "worker", "pid": bystander.pid, "addr": "", "start": ident["start"], "cmdline": worker_cmd},
        # a cluster.json from before start times were recorded: nothing to verify against
        {"role": "coordinator", "pid": bystander.pid, "addr": ""},
    ])
    code = cli_main.main(["down", "--data-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    with pytest.raises(subprocess.TimeoutExpired):
        bystander.wait(timeout=0.5)  # still running: it was never signalled
    assert f"pid {bystander.pid}" in captured.err and "not signalled" in captured.err
    assert "no running cluster found" in captured.out
    assert not (tmp_path / "cluster.json").exists()


@pytest.mark.slow
def test_down_stops_the_processes_up_recorded(tmp_path):
    cluster = LocalCluster(workers=0, standby=False, data_dir=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], stdin=subprocess.DEVNULL)
    try:
        cluster.procs.append(Proc("worker", p))
        cluster.save()
        rec = json.loads((tmp_path / "cluster.json").read_text())["procs"][0]
        assert rec["start"] == proc_identity(p.pid)["start"] and rec["cmdline"] == list(p.args)
        assert stop_from_state(str(tmp_path)) == 1
        assert p.wait(timeout=10) == -signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_the_python_client_checks_numbers_before_sending():
    from idunno import Client  # noqa: PLC0415
    from idunno.client import BadRequest  # noqa: PLC0415

    with Client(coordinator=NOWHERE) as client:  # nothing listens there: a check after the probe would fail otherwise
        with pytest.raises(BadRequest, match="batch must be at most"):
            client.submit("alexnet", "in/", batch=10**30)
        with pytest.raises(BadRequest, match="after must be at least 0"):
            client.command("results", job="job1-alexnet", after=-1)
        with pytest.raises(BadRequest, match="weight must be a finite number"):
            client.command("submit", model="alexnet", inputs="in/", weight=float("nan"))
