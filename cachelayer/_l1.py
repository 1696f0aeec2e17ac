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
from collections.abc import Callable, Iterable

import cachetools

from ._codec import Entry
from .exceptions import ConfigurationError

_SCAN = 32  # bound on the entries one eviction examines, so a write never stalls on a scan
_TOMBSTONES = 10_000  # invalidations remembered one by one; beyond, all readers are suspect


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
        entry = self.pop(victim)
        self.on_remove(victim, entry)
        return victim, entry

    def on_remove(self, key: str, entry: Entry) -> None:
        """Replaced by the owning L1 to keep its tag index in step."""


class L1:
    """Thread-safe bounded map ``key -> Entry``. ``data`` may be read without the lock.

    It also indexes entries by tag, so a tag invalidation drops exactly the entries carrying
    the tag, at once, and the hit path never has to check tags.

    ``trusted`` is False while this process cannot hear invalidations (no pub/sub
    subscription yet, or lost). Everything kept until then is dropped, and from then on an
    entry is kept at most ``degraded_ttl`` seconds (0: not at all). Bypassing L1 outright
    would be the purist's answer, but during a Redis outage it sends every request to the
    database, which is the incident this library exists to prevent; a second of staleness at
    worst is the trade, and ``degraded_l1_ttl=0`` takes the purist's side.
    """

    __slots__ = (
        "_clock",
        "_floor",
        "_store",
        "_tomb_keys",
        "_tomb_tags",
        "by_tag",
        "data",
        "degraded_ttl",
        "enabled",
        "generation",
        "lock",
        "trusted",
    )

    def __init__(self, maxsize: int, clock: Callable[[], float]) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise ConfigurationError(f"l1_maxsize must be an int >= 0, got {maxsize!r}")
        self.enabled = maxsize > 0
        self.trusted = True
        self.degraded_ttl = 1.0
        self._clock = clock
        self._store = _SecondChanceStore(max(maxsize, 1), clock)
        self._store.on_remove = self._unindex  # type: ignore[method-assign]
        self.data = self._store.data
        self.by_tag: dict[str, set[str]] = {}
        self.lock = threading.Lock()
        # Invalidations are numbered. A reader notes the number when it starts; whatever it
        # found may enter L1 only if no invalidation of its key or tags came after that,
        # because the invalidation's own sweep of L1 has already passed.
        self.generation = 0
        self._tomb_keys: dict[str, int] = {}
        self._tomb_tags: dict[str, int] = {}
        self._floor = 0  # readers that started before this are all suspect

    def _tombstone(self, tombs: dict[str, int], names: Iterable[str]) -> None:
        self.generation += 1
        if len(tombs) >= _TOMBSTONES:
            self._tomb_keys.clear()
            self._tomb_tags.clear()
            self._floor = self.generation
        for name in names:
            tombs[name] = self.generation

    def _overtaken(self, key: str, entry: Entry, since: int) -> bool:
        if since < self._floor or self._tomb_keys.get(key, -1) > since:
            return True
        return any(self._tomb_tags.get(t, -1) > since for t in entry.tags)

    def _index(self, key: str, entry: Entry) -> None:
        for tag in entry.tags:
            self.by_tag.setdefault(tag, set()).add(key)

    def _unindex(self, key: str, entry: Entry) -> None:
        for tag in entry.tags:
            keys = self.by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_tag[tag]

    def _remove(self, key: str) -> None:
        entry = self._store.pop(key, None)
        if entry is not None:
            self._unindex(key, entry)

    def put(
        self, key: str, entry: Entry, tags_hold: Callable[[Entry], bool], since: int | None = None
    ) -> bool:
        """Keep ``entry`` unless L1 is off, or an invalidation overtook it: of its key or tags
        after generation ``since`` (when its reader started), or of its tags' versions
        (``tags_hold``). Checked under the lock invalidations take, so none slips between."""
        if not self.enabled or not (self.trusted or self.degraded_ttl):
            return False
        with self.lock:
            if since is not None and self._overtaken(key, entry, since):
                return False
            if entry.tags and not tags_hold(entry):
                return False
            if not self.trusted:
                if not self.degraded_ttl:
                    return False
                cap = self._clock() + self.degraded_ttl
                entry.l1_limit = min(entry.l1_limit, cap)
                entry.l1_fresh = min(entry.l1_fresh, cap)
                entry.l1_expires = min(entry.l1_expires, cap)
            self._remove(key)
            self._store[key] = entry
            self._index(key, entry)
            return True

    def discard(self, key: str, only: Entry | None = None) -> None:
        """Drop ``key``; with ``only``, drop it only if it still holds that very entry."""
        with self.lock:
            if only is None:
                self._tombstone(self._tomb_keys, (key,))
            if only is None or self.data.get(key) is only:
                self._remove(key)

    def drop_tags(self, tags: list[str] | tuple[str, ...]) -> int:
        with self.lock:
            self._tombstone(self._tomb_tags, tags)
            keys = set().union(*(self.by_tag.get(t, ()) for t in tags))
            for key in keys:
                self._remove(key)
            return len(keys)

    def expire(self, key: str, at: float) -> None:
        """Mark an entry stale as of ``at``: still there for fail-safe and stale serving."""
        with self.lock:
            self._tombstone(self._tomb_keys, (key,))
            entry = self.data.get(key)
            if entry is not None and entry.stored_at <= at:
                entry.fresh_until = min(entry.fresh_until, at)
                entry.l1_limit = min(entry.l1_limit, at)
                entry.l1_fresh = min(entry.l1_fresh, at)

    def distrust(self) -> None:
        with self.lock:
            self.trusted = False
            self._store.clear()
            self.by_tag.clear()
            self._tombstone(self._tomb_keys, ())
            self._floor = self.generation

    def trust(self) -> None:
        with self.lock:
            self.trusted = True
            self._store.clear()  # kept while deaf: may have missed an invalidation
            self.by_tag.clear()
            self._tombstone(self._tomb_keys, ())
            self._floor = self.generation

    def clear(self) -> None:
        with self.lock:
            self._store.clear()
            self.by_tag.clear()
            self._tombstone(self._tomb_keys, ())
            self._floor = self.generation

    @property
    def evictions(self) -> int:
        return self._store.evictions

    def __len__(self) -> int:
        return len(self.data)
