"""The worker's pulse: a tiny sidecar process that tells the coordinators the worker process is alive.

Why a process: the worker's loop thread shares the GIL with model loading, image decoding and SDFS
transfers. On a machine whose cores are all busy, a thread waiting for the GIL can wait for seconds
(the GIL "convoy": every reacquisition waits behind the CPU-bound threads, and those are descheduled
while they hold it), so heartbeats from the loop arrive late and a healthy worker was declared
failed. This process holds no GIL anyone else needs; it sends a ``Pulse`` every heartbeat interval
to every coordinator (the standby ignores it and it is no failover vote) as long as the worker is:

- alive: its PID is still our parent (a SIGKILLed worker stops pulsing at once);
- running: not stopped (``/proc/PID/stat`` state ``T``: a SIGSTOPped worker must look failed);
- not wedged: its loop wrote its tick into the shared file within ``worker_wedge_timeout`` seconds.

The worker's loop keeps sending its own ``Heartbeat`` (with its load and loaded models); both feed
the same failure detector on the coordinator. The shared file (``pulse.mmap`` in the worker's data
directory) holds the loop's last tick (8 bytes, ``time.monotonic()``, which is system-wide on Linux)
and the current node id (2-byte length + UTF-8), which changes when the worker starts a new
incarnation; the DEALER's identity follows it.

Run by the worker as ``python -m worker.pulse PARENT_PID FILE``; everything else comes from the
same configuration (environment) as the worker's.
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import zmq

from common import security
from common.config import Config, load_config
from common.identity import PULSE_SUFFIX
from common.protocol import Pulse
from common.transport import make_socket, tcp

FILE_SIZE = 512
_TICK = struct.Struct("<d")
_LEN = struct.Struct("<H")


class PulseFile:
    """The worker's side: one small shared file it writes its tick and node id into."""

    def __init__(self, path: Path, node_id: str) -> None:
        self.path = path
        with open(path, "wb") as fh:
            fh.write(b"\0" * FILE_SIZE)
        self._fh = open(path, "r+b")  # noqa: SIM115 - kept open for the mmap's lifetime
        self.map = mmap.mmap(self._fh.fileno(), FILE_SIZE)
        self.set_node(node_id)
        self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        self.map[0:8] = _TICK.pack(now)

    def set_node(self, node_id: str) -> None:
        raw = node_id.encode()[: FILE_SIZE - 10]
        self.map[10 : 10 + len(raw)] = raw
        self.map[8:10] = _LEN.pack(len(raw))

    def close(self) -> None:
        self.map.close()
        self._fh.close()


class PulseSidecar:
    """The worker's handle on its pulse process: started with the worker, told each new node id."""

    def __init__(self, cfg: Config, path: Path) -> None:
        self.cfg = cfg
        self.path = path
        self.file: PulseFile | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, node_id: str) -> None:
        self.file = PulseFile(self.path, node_id)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.pulse", str(os.getpid()), str(self.file.path)],
            stdin=subprocess.DEVNULL, env={**os.environ, **self.cfg.env()},
        )

    def tick(self, now: float) -> None:
        if self.file is not None:
            self.file.tick(now)

    def set_node(self, node_id: str) -> None:
        if self.file is not None:
            self.file.set_node(node_id)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=2)
            self.proc = None
        if self.file is not None:
            self.file.close()
            self.file = None


def read_file(m: mmap.mmap) -> tuple[float, str]:
    (tick,) = _TICK.unpack(m[0:8])
    (n,) = _LEN.unpack(m[8:10])
    return tick, m[10 : 10 + min(n, FILE_SIZE - 10)].decode(errors="replace")


def process_running(pid: int) -> bool:
    """False if ``pid`` is gone, a zombie, or stopped (SIGSTOP / tracing stop)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("T", "t", "Z", "X")


def run(parent: int, path: Path, cfg: Config) -> int:
    ctx = zmq.Context.instance()
    if cfg.curve_dir:
        security.enable(cfg.curve_dir, security.WORKER, serve=False)  # it speaks for its worker
    with open(path, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), FILE_SIZE)
    socks: list[zmq.Socket] = []
    node = ""
    try:
        while os.getppid() == parent:
            tick, current = read_file(m)
            if current != node:  # a new incarnation: new identity
                for s in socks:
                    s.close(0)
                node = current
                socks = []
                for addr in cfg.coordinators:
                    s = make_socket(ctx, zmq.DEALER, 64 * 1024, identity=(node + PULSE_SUFFIX).encode())
                    s.setsockopt(zmq.SNDHWM, 4)  # a coordinator that is away gets no backlog of stale pulses
                    s.connect(tcp(addr))
                    socks.append(s)
            wedged = time.monotonic() - tick > cfg.worker_wedge_timeout
            # Checked right before sending, so a worker killed a moment ago gets no pulse after its death.
            if not wedged and os.getppid() == parent and process_running(parent):
                frame = Pulse(node).encode()
                for s in socks:
                    try:
                        s.send(frame, flags=zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass  # not connected yet, or the queue is full: the next pulse will do
            time.sleep(cfg.heartbeat_interval)  # this process has nothing else to do
    finally:
        for s in socks:
            s.close(0)
        m.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[0].isdigit():
        print("usage: python -m worker.pulse PARENT_PID FILE", file=sys.stderr)
        return 2
    try:
        return run(int(args[0]), Path(args[1]), load_config())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
