"""Issue #13 at the command-line edge: hostile numbers get a clear error, never a traceback."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from cli import main as cli_main
from cli.cluster import ctl
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
