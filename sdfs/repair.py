"""The repair planner: brings versions back to min(RF, live nodes) replicas from their survivors.

Work is driven by the table's *dirty set*: the versions that may be short of copies because
something happened to them (a holder went down, a copy failed or finished, metadata was loaded,
the target grew). One ``tick`` examines at most MAX_CHECKS_PER_TICK of them and keeps at most
MAX_REPAIRS_IN_FLIGHT copies going, so the cost of a tick does not grow with the namespace and a
big backlog (a restored namespace, a lost node holding 100k files) is worked through over several
ticks instead of stalling the coordinator loop. A version fully replicated on live nodes forgets
its copies on nodes that are down. It is its own part because it is the master's only
background policy: every other part reacts to a request or a report and marks what it touched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Set

from common.config import Config
from common.identity import node_name
from common.protocol import Drop, Replicate
from sdfs.placement import place
from sdfs.table import FileTable, Key, Outbox, VersionMeta

REPAIR_TIMEOUT = 60.0
MAX_REPAIRS_IN_FLIGHT = 512
# Versions examined per repair tick: a big backlog (a restored namespace, a lost node holding
# 100k files) is worked through over several ticks instead of stalling the coordinator loop.
MAX_CHECKS_PER_TICK = 5000

_NONE: frozenset[str] = frozenset()


class RepairPlanner:
    """Turns the dirty set into Replicate commands, bounded per tick; tracks copies in flight."""

    def __init__(self, table: FileTable, cfg: Config, live_nodes: Callable[[], dict[str, str]],
                 load: Callable[[], Counter[str]], changed: Callable[[Iterable[str]], None],
                 stats: Counter[str]) -> None:
        self.table = table
        self.cfg = cfg
        self.live_nodes = live_nodes
        self.load = load  # replicas per node id, puts in flight included (placement spreads by it)
        self.changed = changed
        self.stats = stats
        self.repairs: dict[tuple[str, int, str], float] = {}  # (name, version, target) -> deadline
        self.last_target = 0
        self.loaded = False  # set when the namespace was loaded from disk: the first tick then settles
        self.settle_until: float | None = None

    # -- events that mark versions for a check -------------------------------------------------------
    def node_down(self, node_id: str) -> None:
        """Every version the node held is checked (its copies stay in the metadata: it may come back)."""
        dirty = self.table.dirty
        for key in self.table.held.get(node_name(node_id), ()):
            dirty[key] = None
        self.repairs = {k: d for k, d in self.repairs.items() if k[2] != node_id}

    def stored(self, node_id: str, name: str, version: int, ok: bool, checksum: str) -> Outbox:
        """A target finished (or failed) a copy it was asked for."""
        t = self.table
        self.repairs.pop((name, version, node_id), None)
        t.dirty[(name, version)] = None  # done or failed: the next tick checks it again
        v = t.files.get(name, {}).get(version)
        if not ok or node_id not in self.live_nodes():
            return []
        if v is None or v.checksum != checksum:
            return [(node_id, Drop(name, version))]
        t.add_holder(name, v, node_id)
        self.stats["re_replications"] += 1
        self.stats["bytes_replicated"] += v.size
        self.changed({name})
        return []

    # -- the tick ----------------------------------------------------------------------------------
    def tick(self, now: float) -> Outbox:
        """Re-replicate dirty versions below min(RF, live nodes) from their surviving holders."""
        if self._settling(now):
            return []
        live = self.live_nodes()
        if not live:
            return []
        self._expire_repairs(now, live)
        target_n = min(self.cfg.replication_factor, len(live))
        if target_n > self.last_target:  # more nodes than before: every version may be short of copies
            dirty = self.table.dirty
            for name, versions in self.table.files.items():
                for version in versions:
                    dirty[(name, version)] = None
        self.last_target = target_n
        if not self.table.dirty:
            return []
        return self._plan(now, live, target_n)

    def _settling(self, now: float) -> bool:
        if self.loaded:
            # Started from metadata on disk (a whole-cluster restart): give the nodes a failure
            # timeout to rejoin and report before copying anything, instead of re-replicating onto
            # the first node to arrive what the others are about to report.
            self.loaded = False
            self.settle_until = now + self.cfg.failure_timeout
        return self.settle_until is not None and now < self.settle_until

    def _expire_repairs(self, now: float, live: dict[str, str]) -> None:
        """Copies that timed out or whose target died are forgotten; their versions are checked again."""
        dirty = self.table.dirty
        for k, d in list(self.repairs.items()):
            if d <= now or k[2] not in live:
                del self.repairs[k]
                dirty[(k[0], k[1])] = None

    def _plan(self, now: float, live: dict[str, str], target_n: int) -> Outbox:
        dirty = self.table.dirty
        load = self.load()
        out: Outbox = []
        in_progress: dict[Key, set[str]] = {}
        for name, version, node in self.repairs:
            in_progress.setdefault((name, version), set()).add(node)
        budget = MAX_REPAIRS_IN_FLIGHT - len(self.repairs)  # throttle, as HDFS limits replication work
        done: list[Key] = []
        for checks, key in enumerate(dirty):
            if budget <= 0 or checks >= MAX_CHECKS_PER_TICK:
                break
            settled, cost = self._check(key, live, target_n, in_progress.get(key, _NONE), load, now, out)
            budget -= cost
            if settled:
                done.append(key)
        for key in done:
            dirty.pop(key, None)
        return out

    def _check(self, key: Key, live: dict[str, str], target_n: int, in_progress: Set[str], load: Counter[str],
               now: float, out: Outbox) -> tuple[bool, int]:
        """Plan the copies one dirty version needs (appended to ``out``). Returns whether the version
        leaves the dirty set, and how many copies it counts against the tick's budget."""
        name, version = key
        v = self.table.files.get(name, {}).get(version)
        if v is None:
            return True, 0
        holders = [h for h in v.holders if h in live]
        if not holders:
            return True, 0  # nothing to copy from; a holder's return marks it again
        missing = target_n - len(holders) - len(in_progress)
        if missing <= 0:
            if in_progress:
                return False, 0  # copies under way: their acks mark it again
            if len(holders) >= self.cfg.replication_factor and len(holders) < len(v.holders):
                self._forget_down_holders(name, v, live)
            return True, 0
        targets = place(missing, live, load, exclude=set(holders) | in_progress)
        for t in targets:
            load[t] += 1
            self.repairs[(name, version, t)] = now + REPAIR_TIMEOUT
            out.append((t, Replicate(name, version, v.size, v.checksum, [live[h] for h in holders])))
        # No node to copy to: a join raises the target and marks it again.
        return not targets, missing

    def _forget_down_holders(self, name: str, v: VersionMeta, live: dict[str, str]) -> None:
        """Fully replicated on live nodes: forget copies on nodes that are down (if one comes back
        with its copy, its report adds it again)."""
        for h in [h for h in v.holders if h not in live]:
            self.table.remove_holder(name, v, h)
        self.changed({name})

    def under_replicated(self) -> int:
        """Versions with fewer live holders than min(RF, live nodes) (a full scan: for tests and benches)."""
        live = self.live_nodes()
        target = min(self.cfg.replication_factor, len(live)) if live else 0
        return sum(
            1 for vs in self.table.files.values() for v in vs.values()
            if len([h for h in v.holders if h in live]) < target
        )
