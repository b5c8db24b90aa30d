"""Node identity: ``host:port@incarnation`` so a restarted node is a new member."""

from __future__ import annotations

import time

# A worker's pulse sidecar (worker/pulse.py) connects with the node id plus this as its identity.
PULSE_SUFFIX = "/pulse"


def new_incarnation() -> int:
    # Milliseconds since the epoch: a restart (or a rejoin after being declared failed) gets a larger one.
    return time.time_ns() // 1_000_000


def make_node_id(addr: str, incarnation: int | None = None) -> str:
    return f"{addr}@{incarnation if incarnation is not None else new_incarnation()}"


def split_node_id(node_id: str) -> tuple[str, int]:
    """Return (addr, incarnation); raise ValueError for a malformed id."""
    addr, sep, inc = node_id.rpartition("@")
    if not sep or not addr or not inc.isdigit():
        raise ValueError(f"malformed node id {node_id!r}")
    return addr, int(inc)
