"""Loaded models within a memory budget, least recently used evicted first.

Keys name a model *and* the exact weights it was built from (e.g. an SDFS file's version), so a
new version is a new entry; ``slot`` groups the entries that stand for the same thing (a model's
default weights, or a job's pinned checkpoint), and loading a new entry for a slot drops the old
one: a changed or deleted weights file is never served again once the caller sees the change.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from .weights import model_nbytes, module_nbytes

log = logging.getLogger("idunno.models")

MB = 1024 * 1024


class ModelTooLarge(ValueError):
    """The model alone needs more memory than the whole budget."""


class NoRoom(RuntimeError):
    """Loading would evict a model in use (only when the caller asked to spare those: a preload)."""


@dataclass
class Entry:
    model: Any
    name: str
    slot: Hashable
    nbytes: int
    label: str
    used: float = 0.0  # monotonic time of the last get()


class ModelCache:
    """Thread-safe LRU of loaded classifiers whose sizes add up to at most ``budget_bytes``.

    Sizes are parameter and buffer bytes (what a model keeps; activations of a batch come on top
    and are freed after it). A model is sized *before* it is loaded (``estimate``, from the
    architecture on the meta device) so room is made first and two models never briefly overlap
    beyond the budget. A load that fails is remembered per key, so a bad file is not read again for
    every batch, and forgotten when its slot gets a new key.
    """

    def __init__(self, budget_bytes: int | Callable[[], int], estimate: Callable[[str], int] = model_nbytes,
                 max_models: int = 0) -> None:
        self._budget = budget_bytes if callable(budget_bytes) else (lambda: budget_bytes)
        # A bound on the count as well as the bytes (0: none): the coordinator's pools hold at most
        # this many models per worker, and a worker serving outside its pool (no idle worker while
        # work waits) must still not hold more.
        self.max_models = max(0, int(max_models))
        self._estimate = estimate
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()  # oldest use first
        self._errors: dict[Hashable, tuple[Hashable, str]] = {}  # key -> (slot, message)
        self._lock = threading.RLock()  # held while loading: one load at a time, never the same one twice
        self.evictions = 0
        self.loads = 0

    @property
    def budget(self) -> int:
        return int(self._budget())

    @property
    def used(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def names(self) -> list[str]:
        """Models loaded now (each once), least recently used first."""
        with self._lock:
            return list(dict.fromkeys(e.name for e in self._entries.values()))

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def get(self, key: Hashable, slot: Hashable, name: str, load: Callable[[], Any], label: str = "",
            spare_used_within: float | None = None) -> Any:
        """The model for ``key``, loading it with ``load()`` (after evicting what must go) if needed.

        With ``spare_used_within``, models used that recently are not evicted: NoRoom instead.
        """
        with self._lock:
            now = time.monotonic()
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.used = now
                return entry.model
            self._forget_slot(slot, keep=key)
            err = self._errors.get(key)
            if err is not None:
                raise RuntimeError(err[1])
            need = self._estimate(name)
            budget = self.budget
            if need > budget:
                raise ModelTooLarge(
                    f"model {name} needs {need / MB:.0f} MB, more than this worker's model memory budget "
                    f"(model_memory_mb = {budget / MB:.0f}); raise model_memory_mb or use a smaller model"
                )
            if spare_used_within is not None:
                self._check_room(need, budget, now - spare_used_within)
            self._make_room(need, budget)
            try:
                model = load()
            except Exception as exc:
                msg = f"cannot load model {name!r}: {exc}"
                self._errors[key] = (slot, msg)
                raise RuntimeError(msg) from None
            nbytes = module_nbytes(model.model) if hasattr(model, "model") else need
            self._entries[key] = Entry(model, name, slot, nbytes, label, time.monotonic())
            self.loads += 1
            return model

    def drop_slot(self, slot: Hashable) -> bool:
        """Forget every entry and error of ``slot`` (its weights are gone); True if a model was unloaded."""
        with self._lock:
            return self._forget_slot(slot, keep=None)

    def _forget_slot(self, slot: Hashable, keep: Hashable | None) -> bool:
        stale = [k for k, e in self._entries.items() if e.slot == slot and k != keep]
        for k in stale:
            log.info("unloading %s (%s): its weights changed", self._entries[k].name, self._entries[k].label)
            del self._entries[k]
        for k in [k for k, (s, _) in self._errors.items() if s == slot and k != keep]:
            del self._errors[k]
        if stale:
            gc.collect()
        return bool(stale)

    def _check_room(self, need: int, budget: int, idle_before: float) -> None:
        busy = [e for e in self._entries.values() if e.used > idle_before]
        if sum(e.nbytes for e in busy) + need > budget or 0 < self.max_models <= len(busy):
            raise NoRoom(f"no room within {budget / MB:.0f} MB without unloading "
                         f"{', '.join(e.name for e in busy)} (in use)")

    def _make_room(self, need: int, budget: int) -> None:
        evicted = False
        def full() -> bool:
            return (sum(e.nbytes for e in self._entries.values()) + need > budget
                    or 0 < self.max_models <= len(self._entries))

        while self._entries and full():
            _, old = self._entries.popitem(last=False)
            log.info("evicting %s (%.0f MB, least recently used) to stay within %.0f MB%s",
                     old.name, old.nbytes / MB, budget / MB,
                     f" and {self.max_models} models" if self.max_models else "")
            self.evictions += 1
            evicted = True
        if evicted:
            # Modules can sit in reference cycles: free their tensors now, before the next load.
            gc.collect()
