"""Client commands: the dispatch of a Command to its handler, and the commands that change state
(submit, start, cancel, set_batch_size). The read-only ones are :class:`broker.views.Views`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.jobs import Job, JobState
from broker.views import CommandError, Views
from common.commands import AUTO, COMMANDS, check_args
from common.modelnames import NOOP, resolve_model
from common.protocol import Command, ErrorCode, Ok
from sdfs.master import MasterError

if TYPE_CHECKING:
    from broker.coordinator import Coordinator


class Control:
    def __init__(self, core: Coordinator, views: Views) -> None:
        self.core = core
        self.cfg = core.cfg
        self.views = views
        self.commands: dict[str, Callable[[dict[str, Any], float], Any]] = {
            name: getattr(self, f"cmd_{name}", None) or getattr(views, f"cmd_{name}") for name in COMMANDS
        }

    @property
    def jobs(self) -> Any:
        return self.core.state.jobs

    def on_command(self, ident: bytes, m: Command, now: float) -> None:
        core = self.core
        fn = self.commands.get(m.name)
        if fn is None:
            core.reply_error(ident, m.req, ErrorCode.BAD_REQUEST,
                             f"unknown command {m.name!r}; commands: {', '.join(sorted(COMMANDS))}")
            return
        core.dispatcher.scan.rescan()  # a command (submit, cancel, set_batch_size, ...) may free any worker
        try:
            data = fn(check_args(m.name, dict(m.args)), now)  # every argument's type and range, here
        except CommandError as exc:
            core.reply_error(ident, m.req, exc.code, str(exc))
            return
        except (KeyError, TypeError, ValueError) as exc:
            core.reply_error(ident, m.req, ErrorCode.BAD_REQUEST,
                             f"bad arguments for {m.name}: {exc}; usage: {COMMANDS[m.name].usage()}")
            return
        # Whatever a client is told (a job submitted, a count of results) is durable first: a
        # restart never goes back behind an answer. This commit comes before the loop's group
        # commit (state_commit_interval): one more transaction per command.
        core.commit()
        core.net.send(ident, Ok(m.req, data))

    def _start(self, job_ids: list[str], now: float) -> None:
        self.core.emit("job.start", {"job_ids": job_ids, "ts": self.core.clock()}, now)
        for job_id in job_ids:
            self.core.event("job_started", job_id, now)

    def cmd_start(self, args: dict[str, Any], now: float) -> Any:
        queued = [j.job_id for j in self.jobs.jobs.values() if j.state is JobState.QUEUED]
        if queued:
            self._start(queued, now)
        self.core.dispatcher.dispatch(now)
        return {"started": queued}

    def _submit_args(self, args: dict[str, Any]) -> tuple[str, str, str]:
        """(model, inputs pattern, request id) of a submit, checked."""
        model = args.get("model")
        pattern = args.get("inputs")
        if not isinstance(model, str) or not model.strip():
            raise CommandError(ErrorCode.BAD_REQUEST, "submit needs a model name")
        try:  # now, not when every query fails at the workers
            model = resolve_model(model, self.core.models)
        except ValueError as exc:
            raise CommandError(ErrorCode.BAD_REQUEST, str(exc)) from None
        if not isinstance(pattern, str) or not pattern:
            raise CommandError(ErrorCode.BAD_REQUEST, "submit needs an SDFS glob or prefix of inputs")
        request_id = args.get("request_id") or ""
        if len(request_id) > 64:
            raise CommandError(ErrorCode.BAD_REQUEST, "request_id must be at most 64 characters")
        return model, pattern, request_id

    def _inputs(self, pattern: str, weights: str) -> list[tuple[str, int]]:
        master = self.core.master
        inputs = [(f["name"], f["versions"][0]["version"]) for f in master.ls(pattern) if f["versions"]]
        inputs = [i for i in inputs if not i[0].startswith("results/")]
        if not inputs:
            raise CommandError(ErrorCode.NOT_FOUND, f"no input files match {pattern!r} in SDFS; `put` them first")
        if weights:
            try:  # a pinned checkpoint must exist now, not fail every query at the workers
                master.locate(weights, 1)
            except MasterError as exc:
                raise CommandError(exc.code, f"--weights: {exc}") from None
        return inputs

    def cmd_submit(self, args: dict[str, Any], now: float) -> Any:
        model, pattern, request_id = self._submit_args(args)
        if request_id in self.jobs.by_request:
            # A retry of a submit that was done (its reply was lost or late, or went to the old
            # primary): the same job, not a second one.
            return self.jobs.jobs[self.jobs.by_request[request_id]].describe()
        # Defaults only for what was not given: 0 is an error, not "use the default".
        batch, target = self._batch_args(args.get("batch"), args.get("latency_target"))
        weight = args.get("weight")
        weights = args.get("weights") or ""
        inputs = self._inputs(pattern, weights)
        job_id = self.jobs.new_job_id(model)
        job = Job(job_id, model, inputs, batch, 1.0 if weight is None else weight, weights=weights,
                  submitted=self.core.clock(), latency_target=target, request_id=request_id)
        self.core.emit("job.add", job.snapshot(), now)
        self.preload(job, now)
        self.core.event("job_added", job_id, now)
        if args.get("start") or self.jobs.running():
            self._start([job_id], now)
            self.core.dispatcher.dispatch(now)
        return self.jobs.jobs[job_id].describe()

    def preload(self, job: Job, now: float) -> None:
        """Warm start: the workers of the job's model pool load it now, before its first batch
        (docs/models.md); a worker already in the pool with other weights loaded is told too."""
        if not self.core.is_primary or job.model == NOOP:
            return
        self.core.dispatcher.pools.submitted(job, now)  # a new job is new demand: its pool is planned now

    def _batch_args(self, batch: Any, target: float | None) -> tuple[int, float]:
        """(batch size, latency target) from a command's arguments; batch size 0 means auto."""
        batch = self.cfg.default_batch_size if batch is None else batch
        if batch == AUTO:
            return 0, target or self.cfg.default_latency_target
        if target:
            raise CommandError(ErrorCode.BAD_REQUEST, "--latency-target goes with --batch auto")
        if not 1 <= batch <= self.cfg.max_batch_size:
            raise CommandError(ErrorCode.BAD_REQUEST, f"batch size must be 1..{self.cfg.max_batch_size} or auto")
        return batch, 0.0

    def cmd_set_batch_size(self, args: dict[str, Any], now: float) -> Any:
        job = self.views.job(args)
        n, target = self._batch_args(args["n"], args.get("latency_target"))
        self.core.emit("job.batch", {"job_id": job.job_id, "batch_size": n, "latency_target": target}, now)
        return job.describe()

    def cmd_cancel(self, args: dict[str, Any], now: float) -> Any:
        job = self.views.job(args)
        dropped = 0
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            dropped = len(job.pending)
            self.core.emit("job.cancel", {"job_id": job.job_id, "ts": self.core.clock()}, now)
            self.core.event("job_cancelled", job.job_id, now)
        return job.describe() | {"dropped": dropped, "in_flight": self.jobs.in_flight(job.job_id)}
