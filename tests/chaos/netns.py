"""A multi-host test harness: every node in its own Linux network namespace with its own IP.

Hosts hang off one bridge that lives in a private "hub" namespace, so the machine's own network is
never touched: traffic really crosses veth interfaces as between VMs, and a partition is a veth
link set down. Everything is created by the fixture and removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checks import exactly_once

SUBNET = "10.231.{net}.{host}"
REPO = Path(__file__).resolve().parents[2]


def netns_available() -> str | None:
    """None if namespaces work here, else the reason to skip."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"idnprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create network namespaces: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*args: str) -> None:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")


@dataclass
class Host:
    index: int
    ns: str
    ip: str
    hub_if: str


@dataclass
class Netns:
    n_hosts: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    hosts: list[Host] = field(default_factory=list)
    net: int = field(default_factory=lambda: os.getpid() % 200 + 20)

    @property
    def hub(self) -> str:
        return f"idn{self.tag}hub"

    def create(self) -> Netns:
        sh("ip", "netns", "add", self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i in range(self.n_hosts):
            ns, a, b = f"idn{self.tag}h{i}", f"idn{self.tag}a{i}", f"idn{self.tag}b{i}"
            ip = SUBNET.format(net=self.net, host=i + 1)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            sh("ip", "link", "set", a, "netns", ns)
            sh("ip", "link", "set", b, "netns", self.hub)
            sh("ip", "-n", ns, "link", "set", a, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.hub, "link", "set", b, "master", "br0")
            sh("ip", "-n", self.hub, "link", "set", b, "up")
            self.hosts.append(Host(i, ns, ip, b))
        return self

    def partition(self, host: Host) -> None:
        sh("ip", "-n", self.hub, "link", "set", host.hub_if, "down")

    def heal(self, host: Host) -> None:
        sh("ip", "-n", self.hub, "link", "set", host.hub_if, "up")

    def destroy(self) -> None:
        for h in [*self.hosts, Host(-1, self.hub, "", "")]:
            pids = subprocess.run(["ip", "netns", "pids", h.ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGCONT)
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)


@dataclass
class Node:
    role: str
    host: Host
    popen: subprocess.Popen
    addr: str
    log: Path


class NetnsCluster:
    """Coordinator, standby and workers, each on its own host; a client host for commands."""

    PORT = 7100

    def __init__(self, net: Netns, workers: int, data_dir: Path, env: dict[str, str] | None = None) -> None:
        if net.n_hosts < workers + 3:
            raise ValueError("need a client host, two coordinator hosts and one host per worker")
        self.net = net
        self.data_dir = data_dir
        self.client_host, self.primary_host, self.standby_host = net.hosts[0], net.hosts[1], net.hosts[2]
        self.worker_hosts = net.hosts[3 : 3 + workers]
        self.coordinator = f"{self.primary_host.ip}:{self.PORT}"
        self.standby = f"{self.standby_host.ip}:{self.PORT}"
        self.nodes: list[Node] = []
        self.extra_env = env or {}

    def env(self, host: Host) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(IDUNNO_COORDINATOR=self.coordinator, IDUNNO_STANDBY=self.standby, IDUNNO_HOST=host.ip,
                   IDUNNO_TORCH_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(REPO))
        return env

    def spawn(self, role: str, host: Host, args: list[str]) -> Node:
        log = self.data_dir / f"{role}-{host.index}.log"
        fh = open(log, "ab")  # noqa: SIM115 - handed to the child
        popen = subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable, "-m", "cli.main", *args],
                                 env=self.env(host), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=REPO, start_new_session=True)
        fh.close()
        node = Node(role, host, popen, f"{host.ip}:{self.PORT}", log)
        self.nodes.append(node)
        return node

    def start(self, timeout: float = 60.0) -> NetnsCluster:
        d = self.data_dir
        if "IDUNNO_CURVE_DIR" not in self.extra_env:  # secured like any cluster: keys for every host
            from common import security  # noqa: PLC0415

            keys = d / "keys"
            if not security.has_keys(keys):
                security.init_keys(keys)
            self.extra_env["IDUNNO_CURVE_DIR"] = str(keys)
        self.spawn("coordinator", self.primary_host, ["coordinator", "--bind", self.coordinator, "--peer",
                                                      self.standby, "--data-dir", str(d / "coord-a")])
        self.spawn("standby", self.standby_host, ["coordinator", "--bind", self.standby, "--peer",
                                                  self.coordinator, "--standby", "--data-dir", str(d / "coord-b")])
        for h in self.worker_hosts:
            self.spawn("worker", h, ["worker", "--port", str(self.PORT), "--data-dir", str(d / f"w{h.index}")])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if len(self.alive_workers()) == len(self.worker_hosts):
                    return self
            except RuntimeError:
                pass
            time.sleep(0.5)  # polling a cluster in other namespaces
        raise TimeoutError("netns cluster not ready")

    def client(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run `idunno ...` on the client host."""
        return subprocess.run(["ip", "netns", "exec", self.client_host.ns, sys.executable, "-m", "cli.main", *args],
                              env=self.env(self.client_host), capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)

    def ctl(self, *args: str) -> Any:
        r = self.client("ctl", "--json", *args)
        if r.returncode != 0:
            raise RuntimeError(f"ctl {' '.join(args)} failed: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def alive_workers(self) -> list[dict[str, Any]]:
        return [m for m in self.ctl("members")["members"] if m["state"] == "alive" and m["role"] == "worker"]

    def alive_addrs(self) -> set[str]:
        """Data addresses of the live workers (a node keeps its address across incarnations)."""
        return {m["data_addr"] for m in self.alive_workers()}

    def workers(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "worker" and n.popen.poll() is None]

    def stop(self) -> None:
        for n in self.nodes:
            if n.popen.poll() is None:
                n.popen.send_signal(signal.SIGCONT)
                n.popen.terminate()
        for n in self.nodes:
            try:
                n.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                n.popen.kill()
                n.popen.wait(timeout=5)


@dataclass
class History:
    """Jepsen-style: every operation the test issued, with its outcome, for the checker."""

    ops: list[dict[str, Any]] = field(default_factory=list)

    def record(self, op: str, **data: Any) -> dict[str, Any]:
        entry = {"op": op, "t": time.time(), **data}
        self.ops.append(entry)
        return entry


def check_history(history: History, cluster: NetnsCluster) -> list[str]:
    """No lost and no duplicated result; every acknowledged put's newest version reads back intact."""
    problems = []
    for op in history.ops:
        if op["op"] == "submit" and op.get("ok"):
            job, n = op["job"], op["inputs"]
            check = exactly_once(job, cluster.ctl("results", op["job"])["results"], n)
            problems += check.problems
            op["dropped_duplicates"] = check.dropped_duplicates  # for the report: seen, and not accepted
    for op in history.ops:
        if op["op"] == "put" and op.get("ok"):
            r = cluster.client("sdfs", "get", op["name"], op["readback"])
            if r.returncode != 0:
                problems.append(f"{op['name']}: unreadable ({r.stderr.strip()})")
            elif Path(op["readback"]).read_bytes() != Path(op["local"]).read_bytes():
                problems.append(f"{op['name']}: content differs")
    return problems
