"""Scheduler scale in virtual time: the coordinator's CPU as the simulated cluster grows.

Runs ``tests/test_scale.py``'s scenario (10 equal jobs, a tenth of the workers killed while holding
work, every input answered exactly once) in the in-memory simulated cluster at several sizes, with
inputs growing with the workers, and reports the CPU each run took. The first (smallest) row is
the baseline measured in the same run: a scheduler whose cost per result does not grow with the
number of workers shows a CPU-per-result ratio near 1x; an O(workers) pass per result shows the
size ratio (10x at 1,000 workers against 100).

    .venv/bin/python bench/sim_scale.py [--sizes 100,300,1000]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from benchlib import headline, ratio, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_scale import JOBS, lose_and_duplicate_nothing  # noqa: E402 (the scenario lives with its test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,300,1000", help="worker counts, smallest first (the baseline)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # a hundred "member failed" lines per run say nothing here
    rows, base = [], None
    for workers in [int(x) for x in args.sizes.split(",")]:
        inputs = workers * 3
        cpu = lose_and_duplicate_nothing(workers, inputs)
        per_result = cpu / (inputs * JOBS) * 1e6  # µs of CPU per answered input
        base = base or per_result
        rows.append([f"{workers:,}", f"{inputs * JOBS:,}", f"{cpu:.1f}", f"{per_result:.0f}", ratio(per_result / base)])
    table("Simulated cluster: coordinator + simulation CPU by size (virtual time)",
          ["workers", "results", "CPU s", "µs CPU per result", "vs smallest"], rows,
          caption="one process; CPU time (time.process_time), so a busy machine inflates every row")
    headline(f"CPU per result at {rows[-1][0]} workers: {rows[-1][4]} the {rows[0][0]}-worker baseline")


if __name__ == "__main__":
    main()
