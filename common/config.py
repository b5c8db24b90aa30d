"""One configuration object for every daemon and tool.

Precedence (lowest to highest): defaults here, a TOML file (``--config`` or ``IDUNNO_CONFIG``),
environment variables ``IDUNNO_<FIELD>`` and finally explicit overrides (CLI flags).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from common.failure_detector import DetectorParams


@dataclass
class Config:
    # --- addresses -------------------------------------------------------------------
    host: str = "127.0.0.1"  # address this node binds and advertises (never hard-coded elsewhere)
    coordinator: str = "127.0.0.1:7100"  # primary coordinator control endpoint host:port
    standby: str = ""  # second coordinator endpoint; clients and workers try both
    # --- membership (zguide Paranoid Pirate spirit) -----------------------------------
    heartbeat_interval: float = 0.5
    liveness: int = 3  # heartbeat intervals of silence before a peer may be declared failed (the floor)
    # Adaptive (phi-accrual) failure detection, see docs/failure-detection.md: a peer is declared
    # failed after mean interval + failure_pause + z(failure_phi) * max(std, failure_min_std) seconds
    # of silence, clamped to [heartbeat_interval * liveness, failure_max_timeout].
    failure_phi: float = 8.0
    failure_pause: float = 0.5
    failure_min_std: float = 0.1
    failure_max_timeout: float = 4.0
    worker_wedge_timeout: float = 10.0  # a worker loop silent this long stops its pulse (see worker/pulse.py)
    # --- failover ----------------------------------------------------------------------
    failover_timeout: float = 1.5  # primary silent this long (and workers still heard) -> standby promotes
    # --- limits --------------------------------------------------------------------------
    max_frame_bytes: int = 8 * 1024 * 1024  # zmq.MAXMSGSIZE on every receiving socket
    chunk_bytes: int = 1024 * 1024  # SDFS streaming chunk size
    transfer_window: int = 4  # chunks in flight per transfer
    request_timeout: float = 5.0  # client request/reply timeout before retry/failover
    request_retries: int = 3
    transfer_timeout: float = 15.0  # an SDFS transfer with no progress this long fails (peers may be busy)
    max_name_len: int = 255
    max_batch_size: int = 256
    # --- SDFS ----------------------------------------------------------------------------
    replication_factor: int = 4
    write_quorum: int = 0  # 0 means W = majority of N; never below a majority, never above N
    max_versions: int = 5
    repair_interval: float = 1.0  # how often the master checks under-replication
    # A delete's tombstone is kept until every node that held the file has reported without it, or
    # this long at most (a node away for longer must be wiped before it rejoins; docs/sdfs.md).
    tombstone_ttl: float = 7 * 24 * 3600.0
    # --- inference -----------------------------------------------------------------------
    torch_threads: int = 1
    # Nice increment of a worker's fetch and compute threads (torch's threads inherit it), so the
    # worker's loop thread (heartbeats, task hand-off, SDFS serving) runs ahead of its own inference.
    # Only within the worker: with the kernel's autogroups (the daemons lead their own sessions) other
    # processes are scheduled per session, so it does not yield the machine. 0 = no change.
    compute_nice: int = 5
    preload_models: str = ""  # comma list loaded at worker start, so a job's first batch does not wait
    # false: the worker never imports torch/torchvision (serves only `noop`; other models get a clear
    # error per query). 28 MiB RSS per worker, so 100 workers fit one machine (bench/scale.py).
    torch: bool = True
    # Tasks a worker may hold: its pipelining depth, as Ray Serve's max_ongoing_requests. Two (one
    # computing, one prefetched) for any task; beyond two only while the tasks it holds add up to at
    # most cheap_queue_seconds of measured compute and none has been out longer than that (a worker
    # that turns its tasks around; Dispatcher.eligible): noop queries at batch 1 then travel 8 in a
    # Bundle each way (about 11,000-12,800 queries/s against 6,400 with 2, bench/throughput.py (b)),
    # while a real model's queue, ahead of a new job's first task, stays one task deep.
    worker_credit: int = 8
    cheap_queue_seconds: float = 0.05
    # ...and a prefetched batch is bound to a job only once the worker has at most this many seconds
    # of compute left: a batch queued behind seconds of work makes completions lag dispatches, and
    # the live query rates of fairly served jobs swing by whole batches (seen: 18 % median gap).
    # 0.5 s: with 1 s, a worker's queue swung the completions of a ResNet-50 job against its
    # dispatches enough to put single 10 s rate samples 10-13 % apart (tests/test_streaming.py).
    prefetch_lead: float = 0.5
    # A task holds at most this many seconds of predicted compute on its worker (never below one
    # image; 0 = the job's batch as it is): the scheduler re-decides about this often per worker, so
    # the live query rates of jobs of very different cost stay level (broker/batching.py batch_for).
    task_seconds: float = 1.0
    # Models (docs/models.md): a worker keeps its loaded models within model_memory_mb (0: derived from
    # this machine's memory and the workers on it), evicting the least recently used.
    model_memory_mb: int = 0
    # Model pools (broker/pools.py): models a worker's pool may hold (0: no bound beyond the worker's
    # own model_memory_mb), how often the pools are re-planned at most, and the model load time a
    # move between pools must outlast (hysteresis).
    pool_max_models: int = 0
    pool_replan_interval: float = 5.0
    pool_load_time: float = 5.0
    model_in_use_window: float = 30.0  # a preload (warm start) never evicts a model used this recently
    weights_check_interval: float = 2.0  # a worker re-checks SDFS for a new or deleted weights file this often
    weights_mirror: str = ""  # base URL serving torchvision's checkpoint files for `models pull` ("" = published)
    download_timeout: float = 5.0  # `models pull`: connect/read timeout, so an offline machine fails at once
    default_batch_size: int = 8
    default_latency_target: float = 1.0  # seconds of compute per batch for `--batch auto`
    task_timeout_min: float = 30.0  # floor for the per-task timeout (scaled from measured cost)
    rate_window: float = 10.0
    rate_window_long: float = 30.0  # the steadier second figure `query_rate` reports
    # A batch's results stream back in pieces of about this much compute (never less than one
    # image), so rates, progress and first results move at image granularity; 0 = whole batches.
    stream_interval: float = 0.25
    slow_start: bool = True  # a new job's batches grow 1, 1, 2, 4, ... to its batch size (first result sooner)
    # --- storage -------------------------------------------------------------------------
    data_dir: str = "var"
    metrics_port: int = 0  # 0 = no Prometheus endpoint
    curve_dir: str = ""  # cluster key directory (`idunno up` makes one, `idunno keys init`): CURVE on every TCP socket
    insecure: bool = False  # daemons run without keys (plaintext, no authentication) only when this is set
    log_level: str = "INFO"
    # --- durable coordinator state (broker/state_store.py, docs/durability.md) -----------------
    state_compact_ops: int = 20_000  # journal ops after the last snapshot that trigger a compaction
    # Group commit: the loop commits queued ops once the oldest has waited this long (0 = every loop
    # iteration). A process crash loses at most this much of dispatches and results, which are run
    # again; never what a client was answered (a command commits before its reply).
    state_commit_interval: float = 0.01

    @property
    def failure_timeout(self) -> float:
        return self.heartbeat_interval * self.liveness

    def detector_params(self, min_timeout: float | None = None) -> DetectorParams:
        """Failure-detector settings; ``min_timeout`` overrides the floor (the failover timeout)."""
        floor = self.failure_timeout if min_timeout is None else min_timeout
        return DetectorParams(
            interval=self.heartbeat_interval,
            min_timeout=floor,
            max_timeout=max(self.failure_max_timeout, floor),
            phi=self.failure_phi,
            min_std=self.failure_min_std,
            pause=self.failure_pause,
        )

    @property
    def coordinators(self) -> list[str]:
        return [a for a in (self.coordinator, self.standby) if a]

    def effective_write_quorum(self, n: int) -> int:
        # Default W = majority of N: one slow or dead target does not fail a put (it is replaced, or
        # the version is brought to N in the background), and two majorities always overlap.
        majority = n // 2 + 1
        if self.write_quorum <= 0:
            return majority
        return max(majority, min(self.write_quorum, n))

    def env(self) -> dict[str, str]:
        """This configuration as IDUNNO_* environment variables (for a child process to load it whole)."""
        return {f"IDUNNO_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _coerce(kind: Any, raw: Any, name: str) -> Any:
    kind = {"float": float, "int": int, "str": str, "bool": bool}.get(kind, kind) if isinstance(kind, str) else kind
    if kind is bool and isinstance(raw, str):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind is int:
        # No silent truncation: 2.7 or true is a mistake in a config file, not 2 or 1.
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(f"config {name}: {raw!r} is not a whole number")
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                raise ValueError(f"config {name}: {raw!r} is not a whole number") from None
    try:
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config {name}: cannot use {raw!r} ({exc})") from None


def load_config(path: str | None = None, env: dict[str, str] | None = None, **overrides: Any) -> Config:
    """Build a Config from defaults, TOML, environment and explicit overrides (None means unset)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = path or env.get("IDUNNO_CONFIG")
    if path:
        with open(path, "rb") as fh:
            import tomllib  # noqa: PLC0415 - only when there is a file (CLI start-up time)

            doc = tomllib.load(fh)
        values.update(doc.get("idunno", doc))
    known = {f.name: f for f in fields(Config)}
    for name in known:
        key = f"IDUNNO_{name.upper()}"
        if key in env:
            values[name] = env[key]
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    cfg = Config(**{k: _coerce(known[k].type, v, k) for k, v in values.items()})
    if not math.isfinite(cfg.heartbeat_interval) or cfg.heartbeat_interval <= 0 or cfg.liveness < 1:
        raise ValueError("heartbeat_interval must be a finite number > 0 and liveness >= 1")
    for key in ("failure_phi", "failure_pause", "failure_min_std", "failure_max_timeout", "worker_wedge_timeout"):
        value = getattr(cfg, key)
        if not math.isfinite(value) or value < 0 or (key == "failure_phi" and value <= 0):
            raise ValueError(f"{key} must be a finite number >= 0 (failure_phi > 0)")
    if (cfg.model_memory_mb < 0 or not cfg.weights_check_interval >= 0 or not cfg.model_in_use_window >= 0
            or not 0 < cfg.download_timeout < math.inf):
        raise ValueError("model_memory_mb, weights_check_interval and model_in_use_window must be >= 0, "
                         "download_timeout a finite number > 0")
    if not 0 <= cfg.state_commit_interval <= 1.0:
        raise ValueError("state_commit_interval must be between 0 and 1 second")
    if not 0 <= cfg.cheap_queue_seconds < math.inf:
        raise ValueError("cheap_queue_seconds must be a finite number >= 0")
    if not 0 <= cfg.compute_nice <= 19:
        raise ValueError("compute_nice must be between 0 and 19")
    for key in ("replication_factor", "max_versions", "chunk_bytes", "transfer_window", "worker_credit",
                "state_compact_ops"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1")
    return cfg
