"""Run a command while a CPU hog keeps every core busy (a loaded machine, as users' machines are).

    python bench/hog.py [--per-core 2] -- COMMAND [ARGS...]

Starts ``per-core x cores`` busy-looping processes at normal priority, runs COMMAND, stops the
hog (always, also on Ctrl-C) and exits with COMMAND's exit code. Used by ``make test-loaded`` and
by the benchmarks that measure behaviour under load. Run alone (no COMMAND) it hogs until killed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def _spin() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    x = 0
    while True:  # pure Python busy loop: one full core per process
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


@contextmanager
def cpu_hog(per_core: int = 2) -> Iterator[list[int]]:
    """Keep ``per_core`` busy processes per core while the block runs; yields their PIDs."""
    ctx = mp.get_context("spawn")  # no fork of the caller's threads or sockets
    procs = [ctx.Process(target=_spin, daemon=True, name=f"hog-{i}") for i in range(per_core * (os.cpu_count() or 1))]
    for p in procs:
        p.start()
    try:
        yield [p.pid for p in procs if p.pid is not None]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-core", type=int, default=2, help="busy processes per core (default 2)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.per_core < 1:
        ap.error("--per-core must be >= 1")
    with cpu_hog(args.per_core) as pids:
        print(f"hog: {len(pids)} busy processes on {os.cpu_count()} cores", file=sys.stderr, flush=True)
        if not cmd:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return 0
        try:
            return subprocess.call(cmd)
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
