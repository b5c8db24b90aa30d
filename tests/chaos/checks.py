"""The exactly-once check on a job's results, shared by the chaos checker (netns.py) and the
failover tests: it reads the coordinator's per-query counts, which count every execution of the
one function that records a result, so a duplicate the coordinator accepted shows here (unlike a
map keyed by query, where a second result for the same query cannot appear)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExactlyOnce:
    problems: list[str] = field(default_factory=list)  # any of these fails the check
    dropped_duplicates: int = 0  # answers that arrived for a query already answered, and were not accepted
    redispatched: int = 0  # dispatches beyond the first (a worker failed, a task timed out)

    @property
    def ok(self) -> bool:
        return not self.problems


def exactly_once(job: str, rows: list[dict[str, Any]], total: int) -> ExactlyOnce:
    """Every query of ``job`` (``total`` of them) has one result row, accepted exactly once, after
    at least one dispatch and at least one arrival; arrivals beyond the accepted one are reported
    as dropped duplicates."""
    out = ExactlyOnce()
    seen: dict[int, int] = {}
    for r in rows:
        index = int(str(r["qid"]).rsplit(":", 1)[1])
        seen[index] = seen.get(index, 0) + 1
        accepted, arrivals, dispatches = int(r["accepted"]), int(r["arrivals"]), int(r["dispatches"])
        if accepted != 1:
            out.problems.append(f"{job}:{index}: accepted {accepted} times")
        if arrivals < accepted or dispatches < 1:
            out.problems.append(f"{job}:{index}: {accepted} accepted of {arrivals} arrivals, {dispatches} dispatches")
        out.dropped_duplicates += max(0, arrivals - accepted)
        out.redispatched += max(0, dispatches - 1)
    repeated = sorted(i for i, n in seen.items() if n > 1)
    if repeated:
        out.problems.append(f"{job}: {len(repeated)} queries listed more than once (first {repeated[:5]})")
    missing = sorted(set(range(total)) - seen.keys())
    if missing:
        out.problems.append(f"{job}: {len(missing)} inputs without a result (first {missing[:5]})")
    extra = sorted(seen.keys() - set(range(total)))
    if extra:
        out.problems.append(f"{job}: results for queries it does not have: {extra[:5]}")
    return out
