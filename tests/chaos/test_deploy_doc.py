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


class DocMachines:
    """The three namespaces as the doc's reader sees them: a home directory each, `idunno` on the PATH
    (this tree, with the test's interpreter, as `. .venv/bin/activate` would give), and the doc's
    blocks run there with the example addresses replaced by the namespaces'."""

    def __init__(self, net: Netns, tmp: Path, blocks: dict[str, str]) -> None:
        self.net, self.tmp, self.blocks = net, tmp, blocks
        self.ips = [h.ip for h in net.hosts]
        self.prelude = f"set -e\nA={self.ips[0]} B={self.ips[1]} C={self.ips[2]}\n"
        bindir = tmp / "bin"
        bindir.mkdir()
        shim = bindir / "idunno"
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m cli.main \"$@\"\n")
        shim.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IDUNNO_")}
        self.env.update(PATH=f"{bindir}{os.pathsep}{self.env['PATH']}", PYTHONPATH=str(REPO),
                        IDUNNO_TORCH_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.homes = {name: tmp / name for name in ("a", "b", "c")}
        for d in self.homes.values():
            d.mkdir()

    def sh(self, machine: str, script: str, timeout: float) -> subprocess.CompletedProcess:
        host = self.net.hosts["abc".index(machine)]
        return subprocess.run(["ip", "netns", "exec", host.ns, "bash", "-c", self.prelude + script],
                              cwd=self.homes[machine], env=self.env, capture_output=True, text=True, timeout=timeout)

    def run(self, machine: str, block: str, timeout: float = 120) -> subprocess.CompletedProcess:
        r = self.sh(machine, self.blocks[block], timeout)
        assert r.returncode == 0, f"{block} on {machine}: {r.stdout}\n{r.stderr}"
        return r

    def alive_workers(self) -> list[str]:
        """`idunno ctl members --json` on machine C, with the client block's environment line."""
        r = self.sh("c", self.blocks["client"].splitlines()[0] + "\nidunno ctl members --json\n", 60)
        if r.returncode != 0:
            return []
        members = json.loads(r.stdout)["members"]
        return [m["data_addr"] for m in members if m["role"] == "worker" and m["state"] == "alive"]


def test_deploy_doc_on_three_machines(machines):
    net, tmp = machines
    blocks = doc_blocks()
    assert blocks["env"].strip() == "A=10.0.0.1 B=10.0.0.2 C=10.0.0.3"
    doc = DocMachines(net, tmp, blocks)
    doc.run("a", "keys")
    assert blocks["copy-keys"].strip() == "scp -r keys $B: && scp -r keys $C:"
    for m in ("b", "c"):  # what the scp line does, without ssh between namespaces
        shutil.copytree(doc.homes["a"] / "keys", doc.homes[m] / "keys")
    for m in ("a", "b", "c"):
        doc.run(m, f"machine-{m}")

    # Wait, as a reader would with `idunno ctl members`, until the three workers are alive.
    assert blocks["client"].startswith("export IDUNNO_CURVE_DIR=$PWD/keys IDUNNO_COORDINATOR=$A:7100")
    wait_for(lambda: len(doc.alive_workers()) == 3, timeout=120, interval=0.5, what="3 workers alive")
    assert sorted(doc.alive_workers()) == sorted(f"{ip}:7200" for ip in doc.ips)

    images = doc.homes["c"] / "images"
    images.mkdir()
    for p in sorted(DATA.glob("*.jpg"))[:12]:
        shutil.copy(p, images / p.name)
    out = doc.run("c", "client", timeout=900).stdout
    assert "put 12 files under in/" in out
    assert "job1-alexnet done: 12/12 results" in out
    assert "results of job1-alexnet (12/12" in out
    for ip in doc.ips:  # three machines, three workers in the membership table
        assert f"{ip}:7200" in out
    # The cluster really is encrypted: a client without the keys gets no answer.
    nokeys = subprocess.run(
        ["ip", "netns", "exec", net.hosts[2].ns, sys.executable, "-m", "cli.main", "ctl", "members",
         "--coordinator", f"{doc.ips[0]}:7100"],
        env=dict(doc.env, IDUNNO_REQUEST_TIMEOUT="1", IDUNNO_REQUEST_RETRIES="1"), cwd=tmp, capture_output=True,
        text=True, timeout=60)
    assert nokeys.returncode == 1 and "members: no answer" in nokeys.stderr
