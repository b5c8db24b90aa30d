"""The coordinator's side of the worker pools: feeds :mod:`broker.pools` and acts on its plan.

Demand comes from the replicated jobs (every queued or running job) and the cost table; the
workers and what they have loaded from their sessions (``WorkerSlot.models``). A worker that
joins a model's pool is told to load it (``Preload``) and the change goes on the timeline. The
pools themselves are not replicated: a new primary rebuilds them on its first dispatch pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from broker.jobs import Job, JobState
from broker.pools import Demand, PoolPlanner, summarize
from common.modelnames import NOOP
from common.protocol import Preload

if TYPE_CHECKING:
    from broker.coordinator import Coordinator

log = logging.getLogger("idunno.coordinator.pools")

UNLIMITED = 1 << 20  # models a worker may hold when nothing bounds it
PACE_LEAD = 0.5  # batches a pool's job may lead the least served job by (see PoolKeeper._paced)
COST_STEP = 1.5  # a model's measured cost moving by this factor is a change of demand: replan


class PoolKeeper:
    def __init__(self, core: Coordinator) -> None:
        self.core = core
        self.cfg = core.cfg
        self.planner = PoolPlanner(core.cfg.pool_replan_interval, core.cfg.pool_load_time)
        self.cost_refs: dict[str, float] = {}  # model -> its measured cost when last planned with

    def of(self, worker: str) -> frozenset[str]:
        return self.planner.of(worker)

    def _demand_jobs(self) -> list[Job]:
        return [j for j in self.core.state.jobs.jobs.values()
                if j.state in (JobState.QUEUED, JobState.RUNNING) and j.model != NOOP]

    def _cost(self, model: str, known: dict[str, float]) -> float:
        """A model's measured seconds per image; before any measurement, the mean of the measured
        models (1 s while nothing is measured), so a new model is sized like the others."""
        cost = known.get(model, 0.0)
        if cost > 0:
            return cost
        measured = [c for c in known.values() if c > 0]
        return sum(measured) / len(measured) if measured else 1.0

    def _cost_ref(self, model: str) -> float:
        """The model's measured cost as last planned with (0: none measured yet); it follows the
        measurement only when that moved by more than COST_STEP, so noise does not replan."""
        cost = self.core.state.costs.of(model)
        ref = self.cost_refs.get(model, 0.0)
        if cost > 0 and not (ref / COST_STEP <= cost <= ref * COST_STEP):
            ref = self.cost_refs[model] = cost
        return ref

    def capacity(self, worker: str, models: Iterable[str] = ()) -> int:
        """Models the worker's pool may hold: ``pool_max_models`` when set; else as many of
        ``models`` (those in demand) as fit the budget the worker reports, at their mean size, a
        model no worker has reported sized like the mean of those reported; else no bound. A count
        at the mean size is an estimate: the worker's own cache keeps within its budget exactly,
        evicting the least recently used model."""
        if self.cfg.pool_max_models:
            return self.cfg.pool_max_models
        slot = self.core.dispatcher.slots.get(worker)
        known = self.core.dispatcher.model_mb
        if slot is None or slot.budget_mb <= 0 or not known:
            return UNLIMITED
        mean_known = sum(known.values()) / len(known)
        sizes = [known.get(m, mean_known) for m in models] or [mean_known]
        return max(1, int(slot.budget_mb / (sum(sizes) / len(sizes))))

    def refresh(self, now: float, force: bool = False) -> set[tuple[str, str, str]]:
        """Replan when the demand changed or the replan interval elapsed (see broker.pools); the
        Preloads sent (worker, model, weights)."""
        core = self.core
        slots = core.dispatcher.slots
        jobs = self._demand_jobs()
        # What the plan depends on: the workers (membership changes and sessions; cheap to compare,
        # this runs on every dispatch pass), the jobs (and whether they run) and their models'
        # measured costs: the first measurement replaces the prior, and a cost that moved by more
        # than COST_STEP from the one last planned with replans (a small drift does not).
        costs = {j.model: self._cost_ref(j.model) for j in jobs}
        # The models' sizes matter only when no pool_max_models bounds the pools.
        memory = 0 if self.cfg.pool_max_models else core.dispatcher.memory_seq
        signature = (core.registry.seq, len(slots), memory,
                     tuple((j.job_id, j.weight, j.state is JobState.RUNNING, costs[j.model]) for j in jobs))
        if not force and not self.planner.due(signature, now):
            return set()
        # Sessions not yet Ready are planned too: they get a pool (and its Preload) as they attach.
        workers = [n for n in slots if core.registry.is_alive(n)]
        known = core.state.costs.per_model()
        demand: dict[str, Demand] = {}
        for j in jobs:
            cost = self._cost(j.model, known)
            d = demand.setdefault(j.model, Demand(j.model, 0.0, 0.0, False))
            d.running |= j.state is JobState.RUNNING
            d.work += j.weight * cost
            d.backlog += len(j.pending) * cost
        changes = self.planner.update({w: self.capacity(w, demand) for w in workers},
                                      {w: frozenset(slots[w].models) for w in workers}, demand, signature, now)
        sent: set[tuple[str, str, str]] = set()
        for ch in changes:
            log.debug("pool %s", ch.describe())
            for model in sorted(ch.added - set(slots[ch.worker].models)):
                # Warm start: a worker that joined a pool loads the model now, before its first batch.
                for weights in sorted({j.weights for j in jobs if j.model == model}):
                    sent.add(self._preload(ch.worker, model, weights))
        if changes:
            # One timeline event per replan, not per worker: a thousand workers joining a pool at
            # once is one line for `top` and `report`.
            core.event("pool", summarize(changes), now)
        return sent

    def submitted(self, job: Job, now: float) -> None:
        """Warm start for a new job: its pool is planned now, and the workers of the pool load its
        model; a worker already in the pool (maybe with other weights loaded) is told of a pinned
        checkpoint too. The one place a job's Preloads are sent: a worker the replan just put in
        the pool got the job's weights from it already (it was told twice before)."""
        sent = self.refresh(now, force=True)
        if not job.weights:
            return
        for node in self.core.dispatcher.slots:
            if job.model in self.of(node) and (node, job.model, job.weights) not in sent:
                self._preload(node, job.model, job.weights)

    def _preload(self, worker: str, model: str, weights: str) -> tuple[str, str, str]:
        self.core.net.send(worker.encode(), Preload(model, weights))
        return worker, model, weights

    def serves(self, worker: str, models: tuple[str, ...], backlog: list[Job]) -> list[Job] | None:
        """The backlogged jobs a free worker may serve: its pool's; when none of those has work,
        any (those whose model it has loaded first), so no worker idles while work waits. None:
        every backlogged job is allowed (no restriction to apply); empty: the worker waits.

        Pacing, when some backlogged job is outside the pool: a pool job more than half a batch
        ahead of the job the scheduler owes most (the smallest virtual time) is held back. With
        bounded pools a worker may hold only cheap models while the expensive one lags on the
        others (6 models, 2 per worker, 4 workers, one model needing 3 workers' time: one worker
        holds two cheap models whatever the plan), and left to run, those jobs went 4x as fast as
        the rest (bench/pools.py: 80 % median gap). Equal rates are the fairness goal, so that
        worker waits rather than widen the gap: it helps no job, but no plan within the budget
        can give the lagging model that worker's time without a model load per switch."""
        pool = self.planner.of(worker)
        mine = [j for j in backlog if j.model in pool or j.model == NOOP]
        if mine:
            if len(mine) == len(backlog):
                return None
            paced = self._paced(mine, backlog)
            if paced:
                return paced
            # Every pool job leads: a lagging job whose model the worker has loaded, else wait.
            return self._paced([j for j in backlog if j.model in models and j not in mine], backlog)
        warm = [j for j in backlog if j.model in models]
        return warm if warm and len(warm) < len(backlog) else None

    def _paced(self, jobs: list[Job], backlog: list[Job]) -> list[Job]:
        """``jobs`` less those more than half a batch (per unit of weight) ahead of the least served
        backlogged job, in the scheduler's virtual time (a job not yet in it starts at the floor).
        Half a batch, not a whole one: a whole batch's lead let the paced jobs' live rates run a
        batch ahead in every window (sim, 6 models: 12 % median gap against 7 %); with less the
        throughput was the same (within 1 %)."""
        vtime = self.core.state.scheduler.vtime
        floor = min((vtime[j.job_id] for j in backlog if j.job_id in vtime), default=0.0)
        return [j for j in jobs if vtime.get(j.job_id, floor) - floor
                <= PACE_LEAD * (j.batch_size or self.cfg.default_batch_size) / max(j.weight, 1e-9)]

    def view(self, worker: str) -> dict[str, Any]:
        return {"pool": sorted(self.planner.of(worker))}
