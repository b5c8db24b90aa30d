"""docs/deploy.md, followed literally on three "machines" (network namespaces with their own IPs).

The doc's shell blocks are run as written; only the three example addresses on its first line are
replaced by the namespaces' addresses, as a reader replaces them by theirs. The one step a test cannot
do as written (`scp` of the keys between machines) is done by copying the directory. The systemd units
are checked against the CLI's parser.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, wait_for
from netns import Netns, netns_available

from cli.main import build_parser, command_names, normalize_argv

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "deploy.md"
SKIP = netns_available()


def doc_blocks() -> dict[str, str]:
    """``<!-- deploy:NAME -->`` followed by a fenced sh block -> {NAME: commands}."""
    found = re.findall(r"<!-- deploy:([\w-]+) -->\s*```sh\n(.*?)```", DOC.read_text(), re.S)
    return dict(found)


def test_the_doc_has_every_step():
    assert set(doc_blocks()) == {"env", "keys", "copy-keys", "machine-a", "machine-b", "machine-c", "client"}


@pytest.mark.parametrize("unit", ["idunno-coordinator.service", "idunno-worker.service"])
def test_systemd_units_run_a_valid_command(unit):
    text = (REPO / "deploy" / "systemd" / unit).read_text()
    env = dict(line.split("=", 1) for line in (REPO / "deploy" / "systemd" / "idunno.env").read_text().splitlines()
               if line and not line.startswith("#"))
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    # systemd: ${VAR} is one word, $VAR splits on whitespace (and vanishes when empty).
    words = []
    for w in shlex.split(exec_start):
        m = re.fullmatch(r"\$(\w+)", w)
        if m:
            words += env.get(m.group(1), "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w))
    assert words[0].endswith("/idunno")
    ns = build_parser().parse_args(normalize_argv(words[1:], command_names(build_parser())))
    assert ns.command in ("coordinator", "worker")
    if ns.command == "coordinator":
        assert ns.bind == f"{env['IDUNNO_HOST']}:7100" and ns.peer == env["IDUNNO_PEER"] and ns.shell is False


@pytest.fixture
def machines(tmp_path):
    if SKIP:
        pytest.skip(SKIP)
    net = Netns(n_hosts=3).create()
    try:
        yield net, tmp_path
    finally:
        net.destroy()  # kills every process in the namespaces (the doc's daemons run under nohup)


def test_deploy_doc_on_three_machines(machines):
    net, tmp = machines
    blocks = doc_blocks()
    ips = [h.ip for h in net.hosts]
    env_line = blocks["env"].strip()
    assert env_line == "A=10.0.0.1 B=10.0.0.2 C=10.0.0.3"
    prelude = f"set -e\nA={ips[0]} B={ips[1]} C={ips[2]}\n"
    # `idunno` on the PATH, running this tree with the test's interpreter (as `. .venv/bin/activate` would).
    bindir = tmp / "bin"
    bindir.mkdir()
    shim = bindir / "idunno"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m cli.main \"$@\"\n")
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDUNNO_")}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", PYTHONPATH=str(REPO), IDUNNO_TORCH_THREADS="1",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    homes = {name: tmp / name for name in ("a", "b", "c")}
    for d in homes.values():
        d.mkdir()

    def run(machine: str, block: str, timeout: float = 120) -> subprocess.CompletedProcess:
        host = net.hosts["abc".index(machine)]
        r = subprocess.run(["ip", "netns", "exec", host.ns, "bash", "-c", prelude + blocks[block]],
                           cwd=homes[machine], env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{block} on {machine}: {r.stdout}\n{r.stderr}"
        return r

    run("a", "keys")
    assert blocks["copy-keys"].strip() == "scp -r keys $B: && scp -r keys $C:"
    for m in ("b", "c"):  # what the scp line does, without ssh between namespaces
        shutil.copytree(homes["a"] / "keys", homes[m] / "keys")
    for m in ("a", "b", "c"):
        run(m, f"machine-{m}")

    # Wait, as a reader would with `idunno ctl members`, until the three workers are alive.
    client_env = blocks["client"].splitlines()[0]
    assert client_env.startswith("export IDUNNO_CURVE_DIR=$PWD/keys IDUNNO_COORDINATOR=$A:7100")
    blocks["members-json"] = client_env + "\nidunno ctl members --json\n"

    def alive_workers() -> list[str]:
        r = subprocess.run(["ip", "netns", "exec", net.hosts[2].ns, "bash", "-c", prelude + blocks["members-json"]],
                           cwd=homes["c"], env=env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return []
        members = json.loads(r.stdout)["members"]
        return [m["data_addr"] for m in members if m["role"] == "worker" and m["state"] == "alive"]

    wait_for(lambda: len(alive_workers()) == 3, timeout=120, interval=0.5, what="3 workers alive")
    assert sorted(alive_workers()) == sorted(f"{ip}:7200" for ip in ips)

    images = homes["c"] / "images"
    images.mkdir()
    for p in sorted(DATA.glob("*.jpg"))[:12]:
        shutil.copy(p, images / p.name)
    r = run("c", "client", timeout=900)
    out = r.stdout
    assert "put 12 files under in/" in out
    assert "job1-alexnet done: 12/12 results" in out
    assert "results of job1-alexnet (12/12" in out
    for ip in ips:  # three machines, three workers in the membership table
        assert f"{ip}:7200" in out
    # The cluster really is encrypted: a client without the keys gets no answer.
    nokeys = subprocess.run(
        ["ip", "netns", "exec", net.hosts[2].ns, sys.executable, "-m", "cli.main", "ctl", "members",
         "--coordinator", f"{ips[0]}:7100"],
        env=dict(env, IDUNNO_REQUEST_TIMEOUT="1", IDUNNO_REQUEST_RETRIES="1"), cwd=tmp, capture_output=True,
        text=True, timeout=60)
    assert nokeys.returncode == 1 and "members: no answer" in nokeys.stderr
