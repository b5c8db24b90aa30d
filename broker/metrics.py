"""Prometheus metrics of the coordinator (``--metrics-port``), read from the stats module's snapshot.

The loop thread refreshes a plain-data snapshot about once a second; the HTTP thread only reads
that snapshot, so it never touches the loop's mutable state.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from broker.stats import Distribution

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class CoordinatorCollector(Collector):
    def __init__(self, snapshot_fn) -> None:
        self.snapshot_fn = snapshot_fn

    def collect(self):
        snap: dict[str, Any] | None = self.snapshot_fn()
        if not snap:
            return
        yield from _job_metrics(snap)
        yield from _cluster_metrics(snap)
        yield from _sdfs_metrics(snap["sdfs"])
        term = GaugeMetricFamily("idunno_coordinator_term", "Failover term of this coordinator", labels=["role"])
        term.add_metric([snap["role"]], snap["term"])
        yield term


def _job_metrics(snap: dict[str, Any]) -> list[Metric]:
    completed = CounterMetricFamily("idunno_queries_completed", "Queries completed per job", labels=["job", "model"])
    errors = CounterMetricFamily("idunno_query_errors", "Queries answered with an error", labels=["job", "model"])
    duplicates = CounterMetricFamily("idunno_duplicate_results", "Results dropped because their query already "
                                     "had one (re-dispatched after a failure or timeout)", labels=["job", "model"])
    rate = GaugeMetricFamily("idunno_query_rate", "Images per second over the rate window", labels=["job", "model"])
    pending = GaugeMetricFamily("idunno_pending_queries", "Queries waiting for a worker", labels=["job"])
    inflight = GaugeMetricFamily("idunno_inflight_queries", "Queries at workers now", labels=["job"])
    batch = GaugeMetricFamily("idunno_batch_size", "Current batch size", labels=["job"])
    latency = HistogramMetricFamily("idunno_query_latency_seconds", "Dispatch-to-result latency (bucket edges "
                                    "within 1 %: counted from the latency sketch)", labels=["job", "model"])
    for job, j in snap["jobs"].items():
        completed.add_metric([job, j["model"]], j["completed"])
        errors.add_metric([job, j["model"]], j["errors"])
        duplicates.add_metric([job, j["model"]], j.get("duplicates", 0))
        rate.add_metric([job, j["model"]], snap["rates"][job]["rate"])
        pending.add_metric([job], j["pending"])
        inflight.add_metric([job], j["in_flight"])
        batch.add_metric([job], j["batch_size"])
        dist = Distribution.from_dict(j["latency"])
        buckets = [(str(b), n) for b, n in zip(LATENCY_BUCKETS, dist.cumulative(LATENCY_BUCKETS), strict=True)]
        buckets.append(("+Inf", dist.count))
        latency.add_metric([job, j["model"]], buckets, dist.mean * dist.count)
    return [completed, errors, duplicates, rate, pending, inflight, batch, latency]


def _cluster_metrics(snap: dict[str, Any]) -> list[Metric]:
    members = GaugeMetricFamily("idunno_members", "Members by role and state", labels=["role", "state"])
    for (role, state), n in Counter((m["role"], m["state"]) for m in snap["members"]).items():
        members.add_metric([role, state], n)
    busy = CounterMetricFamily("idunno_worker_busy_seconds", "Compute seconds per worker", labels=["worker"])
    for worker, secs in snap["busy_seconds"].items():
        busy.add_metric([worker], secs)
    slowest = GaugeMetricFamily("idunno_slowest_message_seconds",
                                "Longest time the loop spent handling one message", labels=["type"])
    slowest.add_metric([snap["slowest_message"][0]], snap["slowest_message"][1])
    dropped = CounterMetricFamily("idunno_messages_dropped",
                                  "Messages refused: forged sender, result not answering its task", labels=["reason"])
    for reason, n in snap.get("dropped", {}).items():
        dropped.add_metric([reason], n)
    return [
        members, busy,
        CounterMetricFamily("idunno_failures_detected", "Members declared failed", value=snap["failures_detected"]),
        GaugeMetricFamily("idunno_loop_stall_max_seconds",
                          "Longest gap between two iterations of the coordinator loop since it started",
                          value=snap["loop_stall_max"]),
        slowest,
        GaugeMetricFamily("idunno_heartbeat_gap_max_seconds", "Longest heartbeat silence a live member recovered from",
                          value=snap["heartbeat_gap_max"]),
        dropped,
    ]


def _sdfs_metrics(sdfs: dict[str, Any]) -> list[Metric]:
    return [
        GaugeMetricFamily("idunno_sdfs_files", "Files in SDFS", value=sdfs["files"]),
        GaugeMetricFamily("idunno_sdfs_under_replicated", "Versions below the replication target",
                          value=sdfs["under_replicated"]),
        CounterMetricFamily("idunno_sdfs_bytes_stored", "Bytes written by puts (all replicas)",
                            value=sdfs.get("bytes_stored", 0)),
        CounterMetricFamily("idunno_sdfs_bytes_replicated", "Bytes copied by re-replication",
                            value=sdfs.get("bytes_replicated", 0)),
        CounterMetricFamily("idunno_sdfs_re_replications", "Replicas re-created after a loss",
                            value=sdfs.get("re_replications", 0)),
    ]


def serve_metrics(server, port: int, host: str) -> None:
    REGISTRY.register(CoordinatorCollector(lambda: server.metrics))
    start_http_server(port, addr=host)
