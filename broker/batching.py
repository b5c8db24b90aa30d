"""How big a job's next task is on a worker, and how long it may take: the batch size (fixed, or
`auto` from the latency target as Triton's dynamic batching), bounded so live rates stay level,
and the task's deadline from the measured cost per image. Reads the replicated state, changes nothing."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from broker.jobs import Job

if TYPE_CHECKING:
    from broker.coordinator import Coordinator


class TaskSizer:
    def __init__(self, core: Coordinator) -> None:
        self.core = core
        self.cfg = core.cfg

    @property
    def state(self) -> Any:
        return self.core.state

    def task_timeout(self, job: Job, worker: str, n: int | None = None) -> float:
        per_image = self.state.costs.of(job.model, worker) or self.state.costs.of_worker(worker) or 1.0
        n = n or job.batch_size or self.cfg.max_batch_size
        # Ten times the task's compute and what may wait ahead of it on the worker: at most
        # prefetch_lead of measured work, or one other task (Dispatcher.eligible), whatever the
        # worker's credit.
        own = per_image * n
        return max(self.cfg.task_timeout_min, 10 * (own + max(own, self.cfg.prefetch_lead)))

    def batch_for(self, job: Job, worker: str) -> int:
        """Images in ``job``'s next task on ``worker``: the job's batch (``_job_batch``), bounded so the
        live query rates of fairly served jobs stay level (issue #14):

        - at most ``task_seconds`` of predicted compute on this worker (never below one image): the
          scheduler decides again about every ``task_seconds`` on each worker, and the images a job
          has in flight (dispatched, charged, not yet counted in its rate) stay few. The worker
          computes in streamed pieces of ``stream_interval`` anyway, so the cap costs no batching
          unless it is set below that.
        - while other jobs are backlogged, no more images than their own next task here (scaled by
          weight): fairness is charged per image at dispatch, so the charge between two jobs swings
          by one task, and a job whose tasks are four times the other's swings the 10 s rates by
          that much (AlexNet 8 images against ResNet-50's 2 under load: 12 % of a window). Under
          load the worker computes AlexNet in pieces of about that size anyway; a job whose own
          batch is far above another's (batch 8 beside batch 1) gives up batching for level rates.

        Neither applies with whole-batch results (``stream_interval`` 0), where the task is the
        compute batch. On an idle machine neither bites (batch 8 of AlexNet or ResNet-50 is under
        a second)."""
        if self.cfg.stream_interval <= 0:
            return self._job_batch(job, worker)
        others = [math.ceil(self._bounded_batch(j, worker) * job.weight / j.weight)
                  for j in self.state.jobs.backlogged() if j.job_id != job.job_id and j.weight > 0]
        return max(1, min([self._bounded_batch(job, worker), *others]))

    def slow_start(self, job: Job, n: int) -> int:
        """A new job's batches grow 1, 1, 2, 4, ... up to ``n``, so its first result comes after one
        image's compute, not a whole batch's; and while nothing has measured the model's cost, a
        task holds one image (task_seconds cannot bound it yet: the batches grew to 8 before a
        ResNet-50 result came back, 4 s of one worker under load, and the jobs' live rates stayed
        apart for the next 10 s). Charging is per image: the fairness accounting does not change."""
        if not self.cfg.slow_start:
            return n
        measured = self.state.costs.of(job.model) or job.stats.first_result is not None  # (noop: ~0 s)
        return min(n, max(1, job.counts.sent) if measured else 1)

    def _bounded_batch(self, job: Job, worker: str) -> int:
        """The job's batch held to ``task_seconds`` of compute at its measured cost on this worker."""
        n = self._job_batch(job, worker)
        cost = self.state.costs.of(job.model, worker)
        if cost and self.cfg.task_seconds > 0:
            n = min(n, max(1, int(self.cfg.task_seconds / cost + 1e-9)))
        return n

    def _job_batch(self, job: Job, worker: str) -> int:
        """The job's batch size; for `auto` (dynamic batching, as Triton's), the largest batch whose
        predicted compute on this worker stays under the job's latency target, from this worker's
        measured cost per image for the model (else the cluster's), one image while nothing is measured."""
        if job.batch_size:
            return job.batch_size
        cost = self.state.costs.of(job.model, worker)
        if not cost:
            return 1
        target = job.latency_target or self.cfg.default_latency_target
        return max(1, min(self.cfg.max_batch_size, int(target / cost + 1e-9)))  # 0.36 / 0.09 is 3.999...
