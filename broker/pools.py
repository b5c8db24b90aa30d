"""Model-specific worker pools: which models each worker serves (docs/models.md, issue #15).

Pure planning, no sockets and no state ops: the dispatcher feeds a :class:`PoolPlanner` the live
workers, what each has loaded and the demand per model, and reads back each worker's pool.

Sizing. The fair-time scheduler gives every job equal images per unit of weight, so model ``m``
needs a share of the cluster's compute proportional to ``work(m) = sum(job weights) x cost per
image``. With ``N`` workers its ideal is ``N x work(m) / total`` workers, usually fractional. Every
model with demand first gets whole workers (largest remainder, at least one each while there are
workers to go round); then each model short of its ideal is added, as a second model, to a worker
of a model that has more than its ideal, within the worker's budget (models it may hold). That
"swing" worker serves both, and the fair scheduler decides between them batch by batch, which
is what keeps the rates equal when the ideal split is not a whole number of workers. Budget left
after that is filled with more models (the least served per unit of demand first): pools are as
narrow as memory requires, no narrower, because a narrow pool makes the live rates swing.

Hysteresis. A new plan is adopted only when the demand changed (jobs, weights or workers) or at
most every ``pool_replan_interval``; a worker leaves a model that still has demand only when the
model it gains has more backlog per worker than one model load takes, and a model whose pool a
move changed (a worker left or joined it) loses no worker for an interval: at most one worker
leaves each model per interval, and no move is undone within one. A worker with an empty pool
(new, or its models have no more demand) is assigned freely: nothing is lost by loading onto an
idle worker; a pool over its budget shrinks at once.

The pools live only in the primary's memory: a new primary rebuilds them from the workers' reports
(their loaded models) and the replicated jobs on its first dispatch pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EPS = 1e-9


@dataclass
class Demand:
    model: str
    work: float  # sum of the model's jobs' weights x its cost per image (share of the cluster it needs)
    backlog: float  # seconds of compute its jobs still have queued (what a move would gain)
    running: bool = True  # a job of the model runs (a move away from it costs it throughput)


@dataclass
class PoolChange:
    worker: str
    added: frozenset[str]
    removed: frozenset[str]

    def describe(self) -> str:
        parts = [f"+{m}" for m in sorted(self.added)] + [f"-{m}" for m in sorted(self.removed)]
        return f"{self.worker}: {' '.join(parts)}"


def summarize(changes: list[PoolChange], shown: int = 3) -> str:
    """One line for the timeline: workers grouped by the same change, a few named per group."""
    groups: dict[tuple[frozenset[str], frozenset[str]], list[str]] = {}
    for ch in changes:
        groups.setdefault((ch.added, ch.removed), []).append(ch.worker)
    parts = []
    for (added, removed), workers in groups.items():
        what = " ".join([f"+{m}" for m in sorted(added)] + [f"-{m}" for m in sorted(removed)])
        who = ", ".join(workers[:shown]) + (f" and {len(workers) - shown} more" if len(workers) > shown else "")
        parts.append(f"{who}: {what}")
    return "; ".join(parts)


def apportion(n: int, work: dict[str, float]) -> dict[str, int]:
    """Whole workers per model: ``n`` split by largest remainder of ``n x work / total``, each model
    at least one while ``n`` allows (the most demanding models first)."""
    total = sum(work.values())
    if n <= 0 or total <= 0:
        return dict.fromkeys(work, 0)
    by_need = sorted(work, key=lambda m: (-work[m], m))
    counts = {m: 0 for m in work}
    for m in by_need[:n]:
        counts[m] = 1
    left = n - sum(counts.values())
    ideal = {m: n * work[m] / total for m in work}
    for _ in range(left):
        # the model furthest below its ideal gets the next worker
        m = max(by_need, key=lambda k: (ideal[k] - counts[k], -by_need.index(k)))
        counts[m] += 1
    return counts


def plan(workers: dict[str, int], work: dict[str, float], loaded: dict[str, frozenset[str]],
         current: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """The target pools: ``workers`` maps each worker to the models it may hold (its budget)."""
    names = sorted(workers)
    work = {m: w for m, w in work.items() if w > 0}
    if not names or not work:
        return dict.fromkeys(names, frozenset())
    counts = apportion(len(names), work)
    primary = _assign_primaries(names, counts, loaded, current)
    pools = {w: ({primary[w]} if primary.get(w) else set()) for w in names}
    total = sum(work.values())
    ideal = {m: len(names) * work[m] / total for m in work}
    surplus = {m: counts[m] - ideal[m] for m in work}  # > 0: more whole workers than needed
    for m in sorted(work, key=lambda k: (surplus[k], k)):  # the most underserved first
        while surplus[m] < -EPS:
            host = _swing_host(names, pools, workers, primary, surplus, m, counts[m] == 0)
            if host is None:
                break
            pools[host].add(m)
            spare = max(surplus[primary[host]], 0.0) if primary.get(host) else 1.0
            give = min(-surplus[m], spare)
            if counts[m] == 0 and give <= EPS:
                give = -surplus[m]  # its only worker, shared: the fair scheduler sets its share
            if primary.get(host):
                surplus[primary[host]] -= give
            surplus[m] += give
            counts[m] = 1
    _fill(names, pools, workers, ideal)
    return {w: frozenset(p) for w, p in pools.items()}


def _fill(names: list[str], pools: dict[str, set[str]], budget: dict[str, int], ideal: dict[str, float]) -> None:
    """Spare budget serves more models: a worker with room takes the models with the least
    capacity per unit of demand first. Pools shrink only as far as memory requires: a model
    served by one swing worker gets its share in whole batches on that worker, and its live rate
    swings with them (sim: 13 % median gap against <= 5 % when every worker may serve it)."""
    served = {m: sum(1 for p in pools.values() if m in p) for m in ideal}
    for w in names:
        for m in sorted(ideal, key=lambda k: (served[k] / ideal[k], k)):
            if len(pools[w]) >= budget[w]:
                break
            if m not in pools[w]:
                pools[w].add(m)
                served[m] += 1


def _assign_primaries(names: list[str], counts: dict[str, int], loaded: dict[str, frozenset[str]],
                      current: dict[str, frozenset[str]]) -> dict[str, str]:
    """Which worker serves which model as its first: a worker keeps a model it has loaded, then one
    of its current pool, before it is given any (fewest loads, fewest moves)."""
    need = dict(counts)
    primary: dict[str, str] = {}
    for source in (loaded, current):
        for w in names:
            if w in primary:
                continue
            for m in sorted(source.get(w, ()), key=lambda k: (-need.get(k, 0), k)):
                if need.get(m, 0) > 0:
                    primary[w] = m
                    need[m] -= 1
                    break
    rest = [w for w in names if w not in primary]
    for m in sorted(need, key=lambda k: (-need[k], k)):
        while need[m] > 0 and rest:
            primary[rest.pop(0)] = m
            need[m] -= 1
    return primary


def _swing_host(names: list[str], pools: dict[str, set[str]], budget: dict[str, int], primary: dict[str, str],
                surplus: dict[str, float], model: str, orphan: bool) -> str | None:
    """The worker to serve ``model`` beside its own: one with room, whose primary model has the
    largest surplus (ties: the fewest models, then name)."""
    best: tuple[float, int, str] | None = None
    for w in names:
        if model in pools[w] or len(pools[w]) >= budget[w]:
            continue
        spare = surplus[primary[w]] if primary.get(w) else 1.0
        if spare <= EPS and not orphan:
            continue  # a model with no worker at all takes any room (more models than workers)
        key = (-spare, len(pools[w]), w)
        if best is None or key < best:
            best = key
    return best[2] if best is not None else None


class PoolPlanner:
    """Holds each worker's pool and moves workers between pools with hysteresis."""

    def __init__(self, replan_interval: float, load_time: float) -> None:
        self.replan_interval = replan_interval
        self.load_time = load_time
        self.pools: dict[str, frozenset[str]] = {}
        self.signature: object = None
        self.next_replan = -math.inf
        # model -> when a worker last left or joined its pool by a move (idle workers joining do
        # not count): within an interval of that, the model loses no worker
        self.moved: dict[str, float] = {}

    def of(self, worker: str) -> frozenset[str]:
        return self.pools.get(worker, frozenset())

    def due(self, signature: object, now: float) -> bool:
        """A replan is worth computing: the demand changed, or the last one's interval elapsed."""
        return signature != self.signature or now >= self.next_replan

    def update(self, workers: dict[str, int], loaded: dict[str, frozenset[str]], demand: dict[str, Demand],
               signature: object, now: float) -> list[PoolChange]:
        """Adopt what is worth adopting of the target plan; the changes made, for the timeline."""
        changed = signature != self.signature
        self.signature = signature
        old = {w: self.pools.get(w, frozenset()) for w in workers}
        live = {m for m, d in demand.items() if d.work > 0}
        # Models with no more demand leave the pools at once: nothing is lost (the worker's cache
        # keeps them loaded until it needs the room).
        base = {w: p & live for w, p in old.items()}
        if not changed and now < self.next_replan:
            return self._commit(old, base)
        self.next_replan = now + self.replan_interval
        target = plan(workers, {m: d.work for m, d in demand.items()}, loaded, base)
        return self._commit(old, self._moderate(base, target, loaded, demand, workers, now))

    def _moderate(self, base: dict[str, frozenset[str]], target: dict[str, frozenset[str]],
                  loaded: dict[str, frozenset[str]], demand: dict[str, Demand],
                  budget: dict[str, int], now: float) -> dict[str, frozenset[str]]:
        """The target, less moves that do not pay: a worker leaving a model still in demand is one
        move, allowed once per model per interval and only when what it gains is worth a load."""
        served = {m: sum(1 for p in base.values() if m in p) for m in demand}
        out = dict(base)

        def held(m: str) -> bool:  # the model may not lose a worker now
            return demand[m].running and (served[m] <= 1 or now - self.moved.get(m, -math.inf) < self.replan_interval)

        # Workers whose pool only grows (idle ones included) first: they cost no model anything;
        # pools over their budget last, so the models they drop have their new workers by then.
        order = sorted(target, key=lambda w: (len(base[w]) > budget[w], bool(base[w] - target[w]), w))
        for w in order:
            lose, gain = base[w] - target[w], target[w] - base[w]
            if not lose:
                out[w] = target[w]
                for m in gain:
                    served[m] = served.get(m, 0) + 1
                continue
            if len(base[w]) > budget[w]:
                out[w] = self._shrink(base[w], target[w], budget[w], served, demand, now)
                continue
            # A model no worker serves yet takes one whatever the cost: every job must progress.
            orphan = any(served.get(m, 0) == 0 for m in gain)
            worth = orphan or all(m in loaded.get(w, ()) or
                                  demand[m].backlog / (served.get(m, 0) + 1) > self.load_time for m in gain)
            if gain and not worth:
                continue
            if any(served[m] <= 1 if orphan else held(m) for m in lose):
                # One move per model per interval, and never a model's last worker; the worker
                # still takes on the new model beside its own where its budget allows (a swing).
                if len(base[w] | gain) <= budget[w]:
                    out[w] = base[w] | gain
                    for m in gain:
                        served[m] = served.get(m, 0) + 1
                continue
            out[w] = target[w]
            self._moved(base[w], target[w], served, demand, now)
        # A shrinking pool kept a model it was the last worker of, which a pool after it then took
        # (and that one's shrink may give another such model a second worker: until none does).
        for _ in range(len(order)):
            changed = False
            for w in order:
                if len(out[w]) > budget[w]:
                    pool = self._shrink(out[w], target[w], budget[w], served, demand, now)
                    changed |= pool != out[w]
                    out[w] = pool
            if not changed:
                break
        return out

    def _shrink(self, base: frozenset[str], target: frozenset[str], budget: int, served: dict[str, int],
                demand: dict[str, Demand], now: float) -> frozenset[str]:
        """A pool over its budget (the sizes the workers report shrank it) shrinks now, whatever the
        holds: the budget is memory. It keeps the running models it is the last worker of, then its
        target's (those it has first), up to the budget; over it only when it is the last worker of
        more running models. A queued model may lose its last worker (the next plan gives it one)."""
        pool = {m for m in base if served.get(m, 0) <= 1 and demand[m].running}
        for m in sorted(target, key=lambda k: (k not in base, k)):
            if len(pool) >= budget:
                break
            pool.add(m)
        new = frozenset(pool)
        self._moved(base, new, served, demand, now)
        return new

    def _moved(self, old: frozenset[str], new: frozenset[str], served: dict[str, int], demand: dict[str, Demand],
               now: float) -> None:
        """Count a worker's move from pool ``old`` to ``new``: the models it left and joined are held
        for an interval. A model that just gained a worker keeps it: without that, the next cost
        measurement's replan moved a worker back 0.2 s later (bench/pools.py: worker-3 +alexnet
        -vgg16, then +vgg16 -alexnet), two loads of 528 MB for nothing."""
        for m in old - new:
            served[m] -= 1
        for m in new - old:
            served[m] = served.get(m, 0) + 1
        for m in old ^ new:
            if demand[m].running:
                self.moved[m] = now

    def _commit(self, old: dict[str, frozenset[str]], new: dict[str, frozenset[str]]) -> list[PoolChange]:
        self.pools = new
        return [PoolChange(w, new[w] - old[w], old[w] - new[w]) for w in sorted(new) if new[w] != old[w]]
