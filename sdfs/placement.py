"""Where new replicas go: the least loaded live nodes, ties broken at random.

One function shared by the write path (a put's targets, pipeline recovery) and the repair planner
(re-replication targets), so both spread replicas by the same rule.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Set


def place(n: int, live: dict[str, str], load: Counter[str], exclude: Set[str] = frozenset()) -> list[str]:
    """Up to ``n`` live node ids, least loaded first, none of them in ``exclude``."""
    candidates = [node for node in live if node not in exclude]
    random.shuffle(candidates)  # tie-break so equal loads spread
    candidates.sort(key=lambda node: load[node])
    return candidates[:n]
