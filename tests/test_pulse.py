"""The worker's pulse sidecar: pulses while its worker is alive, running and not wedged; never otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from conftest import wait_for

from cli.cluster import free_port_block
from common.identity import PULSE_SUFFIX
from common.protocol import Pulse, decode
from worker.pulse import PulseFile, process_running, read_file

pytestmark = pytest.mark.slow


def test_pulse_file_round_trip(tmp_path: Path) -> None:
    pf = PulseFile(tmp_path / "p", "127.0.0.1:1@5")
    pf.tick(123.5)
    assert read_file(pf.map) == (123.5, "127.0.0.1:1@5")
    pf.set_node("127.0.0.1:1@6")
    assert read_file(pf.map) == (123.5, "127.0.0.1:1@6")
    pf.close()


def test_process_running_sees_stopped_and_dead_processes() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_running(child.pid)
        child.send_signal(signal.SIGSTOP)
        wait_for(lambda: not process_running(child.pid), timeout=10, what="stopped state visible")
        child.send_signal(signal.SIGCONT)
        wait_for(lambda: process_running(child.pid), timeout=10, what="running again")
    finally:
        child.kill()
        child.wait()
    assert not process_running(child.pid)


@pytest.fixture
def coordinator():
    """A bare ROUTER standing in for a coordinator: the test reads what the sidecar sends."""
    port = free_port_block("127.0.0.1", 3)
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    yield sock, f"127.0.0.1:{port}"
    sock.close()


def env_for(addr: str) -> dict[str, str]:
    return {**os.environ, "IDUNNO_COORDINATOR": addr, "IDUNNO_STANDBY": "", "IDUNNO_HEARTBEAT_INTERVAL": "0.1",
            "IDUNNO_WORKER_WEDGE_TIMEOUT": "1.0", "IDUNNO_CURVE_DIR": ""}


def pulses(sock: zmq.Socket, seconds: float) -> list[tuple[bytes, str]]:
    got = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            ident, frame = sock.recv_multipart()
            msg = decode(frame)
            assert isinstance(msg, Pulse)
            got.append((ident, msg.node_id))
    return got


def test_pulses_follow_the_node_id_and_stop_when_the_loop_is_wedged(coordinator, tmp_path: Path) -> None:
    sock, addr = coordinator
    pf = PulseFile(tmp_path / "pulse.mmap", "127.0.0.1:9@1")
    proc = subprocess.Popen([sys.executable, "-m", "worker.pulse", str(os.getpid()), str(pf.path)], env=env_for(addr))
    try:
        def fresh() -> None:
            pf.tick(time.monotonic())

        def ticking(seconds: float) -> list[tuple[bytes, str]]:
            # The worker's loop ticks on while we listen: the wedge timeout is 1 s, and a busy machine
            # can take longer than that to start the sidecar (a single tick went stale before it ran).
            fresh()
            return pulses(sock, seconds)

        first = wait_for(lambda: ticking(0.3), timeout=30, what="first pulse")
        assert first[0] == ((b"127.0.0.1:9@1" + PULSE_SUFFIX.encode()), "127.0.0.1:9@1")
        wait_for(lambda: len(ticking(0.6)) >= 3, timeout=10,  # one per 0.1 s heartbeat interval, give or take
                 what="steady pulses")
        # A new incarnation: the identity follows.
        pf.set_node("127.0.0.1:9@2")
        wait_for(lambda: any(n == "127.0.0.1:9@2" for _, n in ticking(0.3)), timeout=10,
                 what="pulse under the new node id")
        # The worker's loop stops ticking: after the wedge timeout (1 s here) the pulse stops too.
        wait_for(lambda: not pulses(sock, 0.5), timeout=10, what="pulses to stop for a wedged loop")
        wait_for(lambda: ticking(0.3), timeout=10, what="pulses to resume once the loop ticks again")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        pf.close()


def test_sidecar_exits_when_its_worker_dies(coordinator, tmp_path: Path) -> None:
    _, addr = coordinator
    pf = PulseFile(tmp_path / "pulse.mmap", "127.0.0.1:9@1")
    pid_file = tmp_path / "sidecar.pid"
    # A stand-in worker that starts the sidecar, reports its pid and waits to be killed.
    script = (
        "import os, subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'worker.pulse', str(os.getpid()), {str(pf.path)!r}])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], env=env_for(addr))
    try:
        sidecar = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=30, what="sidecar pid"))
        assert process_running(sidecar)
        parent.kill()
        parent.wait()
        wait_for(lambda: not process_running(sidecar), timeout=10, what="sidecar to exit after its worker died")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        pf.close()
