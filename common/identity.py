"""Node identity: ``name@incarnation``.

The name is the node's stable identity: it names its data directory, so a worker restarted under
the same name comes back with its SDFS replicas. The incarnation changes on every start (and on
every rejoin after being declared failed), so a restarted node is still a new member and nobody
trusts state from before its absence. The data address is not part of the id: it travels in Join.
"""

from __future__ import annotations

import functools
import re
import time

# A worker's pulse sidecar (worker/pulse.py) connects with the node id plus this as its identity.
PULSE_SUFFIX = "/pulse"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def new_incarnation(after: int = 0) -> int:
    """Milliseconds since the epoch: a restart (or a rejoin after being declared failed) gets a
    larger one. ``after`` is the incarnation being replaced: the new one is always above it, even
    when the rejoin comes within the same millisecond or the wall clock stepped back (NTP), since
    members compare incarnations to tell a new start from an old one."""
    return max(time.time_ns() // 1_000_000, after + 1)


def validate_node_name(name: str) -> str:
    """A node name: letters, digits, ``.``, ``_``, ``-`` (it is a directory name and part of the id)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"bad node name {name!r}: 1-64 letters, digits, '.', '_' or '-', not starting with "
                         f"'.', '_' or '-'")
    return name


def default_node_name(host: str, port: int) -> str:
    """The name of a worker started without ``--name``: from its address, stable while the port is fixed."""
    return validate_node_name("worker-" + re.sub(r"[^A-Za-z0-9.]+", "-", f"{host}-{port}").strip("-.")[:56])


def make_node_id(name: str, incarnation: int | None = None) -> str:
    return f"{name}@{incarnation if incarnation is not None else new_incarnation()}"


def split_node_id(node_id: str) -> tuple[str, int]:
    """Return (name, incarnation); raise ValueError for a malformed id."""
    name, sep, inc = node_id.rpartition("@")
    if not sep or not name or not inc.isdigit():
        raise ValueError(f"malformed node id {node_id!r}")
    return name, int(inc)


@functools.lru_cache(maxsize=65536)  # few distinct ids, looked up for every replica a node reports
def node_name(node_id: str) -> str:
    """The stable part of a node id (its name); the id itself if it is not ``name@incarnation``."""
    try:
        return split_node_id(node_id)[0]
    except ValueError:
        return node_id
