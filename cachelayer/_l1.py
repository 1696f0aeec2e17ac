"""The in-process tier: a bounded cachetools store with lock-free reads.

cachetools' ``LRUCache`` reorders its bookkeeping on every read, which costs more under a lock
than our whole hit budget, and its reads are not safe without one. So the store is a
``cachetools.Cache`` (which does the size accounting) with *second-chance* eviction: a hit only
sets ``entry.visited``; when room is needed, the oldest entries are examined, expired ones go
first, visited ones get their bit cleared and move to the back, and the first unvisited one is
evicted. That approximates LRU closely for skewed (Zipf) traffic, and it lets a hit be a single
``dict.get`` with no lock: writers hold ``lock``; readers only ever see a whole entry or none.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import cachetools

from ._codec import Entry
from .exceptions import ConfigurationError

_SCAN = 32  # bound on the entries one eviction examines, so a write never stalls on a scan


class _SecondChanceStore(cachetools.Cache):  # type: ignore[type-arg]
    def __init__(self, maxsize: int, clock: Callable[[], float]) -> None:
        super().__init__(maxsize)
        self.clock = clock
        self.evictions = 0
        self.data: dict[str, Entry] = self._Cache__data  # type: ignore[attr-defined]
        if type(self.data) is not dict:  # pragma: no cover - guards a cachetools refactor
            raise RuntimeError("unsupported cachetools version: its storage is not a dict")

    def popitem(self) -> tuple[str, Entry]:
        data = self.data
        now = self.clock()
        victim = None
        for key in list(itertools.islice(data, _SCAN)):
            entry = data[key]
            if entry.l1_expires <= now or not entry.visited:
                victim = key
                break
            entry.visited = False
            del data[key]  # move to the back: a second chance
            data[key] = entry
        if victim is None:
            victim = next(iter(data))
        self.evictions += 1
        return victim, self.pop(victim)


class L1:
    """Thread-safe bounded map ``key -> Entry``. ``data`` may be read without the lock."""

    __slots__ = ("_store", "data", "enabled", "lock")

    def __init__(self, maxsize: int, clock: Callable[[], float]) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise ConfigurationError(f"l1_maxsize must be an int >= 0, got {maxsize!r}")
        self.enabled = maxsize > 0
        self._store = _SecondChanceStore(max(maxsize, 1), clock)
        self.data = self._store.data
        self.lock = threading.Lock()

    def put(self, key: str, entry: Entry) -> None:
        if self.enabled:
            with self.lock:
                self._store[key] = entry

    def discard(self, key: str, only: Entry | None = None) -> None:
        """Drop ``key``; with ``only``, drop it only if it still holds that very entry."""
        with self.lock:
            if only is None or self.data.get(key) is only:
                self._store.pop(key, None)

    def clear(self) -> None:
        with self.lock:
            self._store.clear()

    @property
    def evictions(self) -> int:
        return self._store.evictions

    def __len__(self) -> int:
        return len(self.data)

    def snapshot(self) -> dict[str, Any]:
        return {"entries": len(self.data), "maxsize": self._store.maxsize if self.enabled else 0}
