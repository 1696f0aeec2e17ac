"""``Cache``: configuration, the sync and async entry points, and the helpers both share.

Every public method has an async twin with an ``a`` prefix and the same semantics. The helpers
prefixed ``_`` are the no-I/O steps of the read path (L1 lookup, accepting bytes from Redis,
preparing a loaded value for storage); ``_flow.read_through`` strings them together and the
drivers in ``_flow`` run it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

from ._codec import CorruptEntryError, Entry, decode_value, encode_value, pack_entry, unpack_entry
from ._flight import Flights
from ._flow import drive_async, drive_sync, read_through
from ._keys import RedisKeys, validate_namespace
from ._l1 import L1
from ._policy import bound_for_l1, check_jitter, check_seconds, new_entry, redis_px
from ._redis import AsyncTier, BackendHealth, Clients, SyncTier
from ._stats import Stats
from .exceptions import ConfigurationError, InvalidKeyError, SerializationError

log = logging.getLogger("cachelayer")

T = TypeVar("T")
_MISSING: Any = object()


def check_tags(tags: Any) -> tuple[str, ...]:
    if isinstance(tags, str) or not isinstance(tags, (tuple, list, set, frozenset)):
        raise ConfigurationError(f"tags must be a tuple of strings, got {tags!r}")
    if not all(isinstance(t, str) and t for t in tags):
        raise ConfigurationError(f"every tag must be a non-empty string, got {tags!r}")
    return tuple(tags)


def check_key(key: Any) -> str:
    if type(key) is not str:
        raise InvalidKeyError(f"cache keys are strings, got {type(key).__name__}: {key!r}")
    return key


class Options:
    """What to do with a loaded value: resolved once per decorator, or per direct call."""

    __slots__ = ("cache_none", "stale_ttl", "tags", "ttl")

    def __init__(self, ttl: float, stale_ttl: float, tags: tuple[str, ...], cache_none: bool):
        self.ttl = ttl
        self.stale_ttl = stale_ttl
        self.tags = tags
        self.cache_none = cache_none


class Loaded(Generic[T]):
    """What a loader returns when the loaded value itself decides how it is cached.

    ``return Loaded(page, ttl=max_age)`` stores ``page`` for ``max_age`` seconds;
    ``Loaded(value, store=False)`` hands ``value`` to every waiting caller without storing it.
    Fields left as None keep the call's or decorator's settings. Callers receive ``value``,
    never the wrapper.
    """

    __slots__ = ("stale_ttl", "store", "tags", "ttl", "value")

    def __init__(
        self,
        value: T,
        *,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        tags: Iterable[str] | None = None,
        store: bool = True,
    ) -> None:
        self.value = value
        self.ttl = check_seconds("ttl", ttl, allow_zero=False, allow_none=True)
        self.stale_ttl = check_seconds("stale_ttl", stale_ttl, allow_zero=True, allow_none=True)
        self.tags = None if tags is None else check_tags(tags)
        self.store = bool(store)

    def __repr__(self) -> str:
        return f"Loaded({self.value!r}, ttl={self.ttl}, stale_ttl={self.stale_ttl})"

    def apply(self, opts: Options) -> Options:
        return Options(
            opts.ttl if self.ttl is None else self.ttl,
            opts.stale_ttl if self.stale_ttl is None else self.stale_ttl,
            opts.tags if self.tags is None else self.tags,
            opts.cache_none,
        )


class Cache:
    """A read-through cache: in-process L1 in front of an optional Redis L2.

    Args:
        redis: a URL (the cache then owns a sync and an asyncio client, made on first use), a
            ``redis.Redis``, a ``redis.asyncio.Redis``, or None for L1 only.
        namespace: prefix of every Redis key; caches sharing a namespace share entries.
        ttl: default seconds an entry is fresh.
        stale_ttl: default seconds an entry is kept after its freshness ends (grace).
        jitter: fraction by which each TTL is spread, ``ttl * (1 ± jitter)``.
        l1_maxsize: entries kept in process; 0 disables L1.
        l1_ttl: cap, in seconds, on how long this process trusts its own copy of an entry.
        l1_copy: if True, L1 keeps encoded bytes and every caller gets its own decoded copy,
            so mutating a returned value can never affect another caller. If False (default,
            and much faster), callers in one process share the object L1 holds: treat
            returned values as read-only, as with ``functools.lru_cache``.
        cache_none: cache ``None`` results (a stored ``None`` is a hit, not a miss).
        clock: zero-argument callable returning wall-clock seconds (``time.time``).
        strict: raise ``BackendError`` / ``SerializationError`` on Redis trouble or corrupt
            bytes instead of failing open to the loader.
        redis_timeout: socket and connect timeout of owned clients, in seconds.
        rng: ``random.Random`` used for jitter (seed it in tests).
    """

    def __init__(
        self,
        redis: Any = None,
        *,
        namespace: str = "cachelayer",
        ttl: float = 60.0,
        stale_ttl: float = 0.0,
        jitter: float = 0.1,
        l1_maxsize: int = 10_000,
        l1_ttl: float | None = None,
        l1_copy: bool = False,
        cache_none: bool = True,
        clock: Callable[[], float] | None = None,
        strict: bool = False,
        redis_timeout: float = 0.25,
        rng: random.Random | None = None,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        self._defaults = Options(
            check_seconds("ttl", ttl, allow_zero=False),
            check_seconds("stale_ttl", stale_ttl, allow_zero=True),
            (),
            bool(cache_none),
        )
        self._jitter = check_jitter(jitter)
        self._l1_ttl = check_seconds("l1_ttl", l1_ttl, allow_zero=False, allow_none=True)
        if clock is not None and not callable(clock):
            raise ConfigurationError(f"clock must be a zero-argument callable, got {clock!r}")
        self._clock: Callable[[], float] = clock or time.time
        self._rng = rng or random.Random()
        self._copy = bool(l1_copy)
        self._stats = Stats()
        self._l1 = L1(l1_maxsize, self._clock)
        self._clients = Clients(
            redis, check_seconds("redis_timeout", redis_timeout, allow_zero=False)
        )
        self._has_l2 = self._clients.enabled
        self._health = BackendHealth(strict=bool(strict), stats=self._stats)
        self._strict = bool(strict)
        self._sync_tier = SyncTier(self._clients, self._health) if self._has_l2 else None
        self._async_tier = AsyncTier(self._clients, self._health) if self._has_l2 else None
        self._rkeys = RedisKeys(self.namespace)
        self._flights: Flights[Entry] = Flights(self._stats)

    def __repr__(self) -> str:
        tiers = "L1+Redis" if self._has_l2 else "L1"
        return f"<Cache namespace={self.namespace!r} {tiers} ttl={self._defaults.ttl}>"

    # --- shared steps of the read path (no I/O) -------------------------------------------

    def _options(self, ttl: Any, stale_ttl: Any, tags: Any, cache_none: bool | None) -> Options:
        d = self._defaults
        return Options(
            d.ttl if ttl is None else check_seconds("ttl", ttl, allow_zero=False),
            d.stale_ttl
            if stale_ttl is None
            else check_seconds("stale_ttl", stale_ttl, allow_zero=True),
            check_tags(tags),
            d.cache_none if cache_none is None else bool(cache_none),
        )

    def _l1_fresh(self, key: str, now: float) -> Entry | None:
        entry = self._l1.data.get(key)
        if entry is not None and now < entry.l1_fresh:
            entry.visited = True
            self._stats.l1_hits += 1
            return entry
        return None

    def _accept_l2(self, key: str, data: bytes, now: float) -> Entry | None:
        """Decode bytes read from Redis; a fresh entry is kept in L1 and returned."""
        try:
            entry = unpack_entry(data)
        except CorruptEntryError as exc:
            self._stats.corrupt_entries += 1
            log.warning("cachelayer: treating undecodable bytes under %r as a miss: %s", key, exc)
            if self._strict:
                raise SerializationError(
                    f"corrupt entry under key {key!r}: {exc}", key=key
                ) from exc
            return None
        if now >= entry.fresh_until:
            return None
        self._stats.l2_hits += 1
        self._keep(key, entry, now)
        return entry

    def _prepare(self, key: str, value: Any, load_time: float, opts: Options) -> Entry:
        """Wrap a loaded value; ``payload`` stays None when it must not be stored."""
        now = self._clock()
        payload = None
        store = True
        if type(value) is Loaded:
            opts, store, value = value.apply(opts), value.store, value.value
        if store and (value is not None or opts.cache_none):
            try:
                payload = encode_value(value, key)
            except SerializationError as exc:
                self._stats.serialization_errors += 1
                log.warning("cachelayer: not caching the value loaded for %r: %s", key, exc)
        if payload is None:
            return Entry(value, None, now, now, now, load_time, opts.tags)
        return self._new_entry(value, payload, now, load_time, opts)

    def _new_entry(
        self, value: Any, payload: bytes, now: float, load_time: float, opts: Options
    ) -> Entry:
        return new_entry(
            value,
            payload,
            now=now,
            ttl=opts.ttl,
            stale_ttl=opts.stale_ttl,
            jitter=self._jitter,
            rng=self._rng,
            load_time=load_time,
            tags=opts.tags,
        )

    def _keep(self, key: str, entry: Entry, now: float | None = None) -> None:
        bound_for_l1(entry, entry.stored_at if now is None else now, self._l1_ttl)
        # One representation per mode: shared objects, or bytes decoded per caller.
        if self._copy:
            entry.value = None
        else:
            entry.payload = None
        self._l1.put(key, entry)

    def _value(self, entry: Entry) -> Any:
        if self._copy and entry.payload is not None:
            return decode_value(entry.payload)
        return entry.value

    def _load_sync(self, key: str, loader: Callable[[], Any], opts: Options) -> Any:
        entry = self._flights.run_sync(
            key, lambda: drive_sync(read_through(self, key, opts), self._sync_tier, loader)
        )
        return self._value(entry)

    async def _load_async(
        self, key: str, loader: Callable[[], Awaitable[Any]], opts: Options
    ) -> Any:
        async def lead() -> Entry:
            flow = read_through(self, key, opts)
            return await drive_async(flow, self._async_tier, loader)  # type: ignore[no-any-return]

        return self._value(await self._flights.run_async(key, lead))

    def _stored(
        self, key: str, value: Any, ttl: Any, stale_ttl: Any, tags: Any
    ) -> tuple[Entry, bytes]:
        """An entry for an explicit ``set``: unlike a load, an unencodable value raises."""
        opts = self._options(ttl, stale_ttl, tags, None)
        entry = self._new_entry(value, encode_value(value, key), self._clock(), 0.0, opts)
        return entry, pack_entry(entry)

    # --- sync API ---------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The fresh value under ``key`` from L1 or Redis, else ``default``."""
        check_key(key)
        entry = drive_sync(read_through(self, key, None), self._sync_tier, None)
        return default if entry is None else self._value(entry)

    def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        tags: Iterable[str] = (),
    ) -> None:
        """Store ``value`` in both tiers; raises ``SerializationError`` if it cannot be."""
        check_key(key)
        entry, data = self._stored(key, value, ttl, stale_ttl, tags)
        if self._sync_tier is not None:
            px = redis_px(entry, entry.stored_at)
            if px > 0:
                self._sync_tier.set(self._rkeys.value(key), data, px)
        self._keep(key, entry)

    def delete(self, *keys: str) -> None:
        """Remove entries from L1 and Redis."""
        for key in keys:
            self._l1.discard(check_key(key))
        if self._sync_tier is not None and keys:
            self._sync_tier.delete([self._rkeys.value(k) for k in keys])

    def get_or_load(
        self,
        key: str,
        loader: Callable[[], T],
        *,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        tags: Iterable[str] = (),
        cache_none: bool | None = None,
    ) -> T:
        """The cached value under ``key``; on a miss, ``loader()`` runs once per key across
        concurrent callers in this process and its result is stored in both tiers."""
        entry = self._l1_fresh(check_key(key), self._clock())
        if entry is not None:
            return self._value(entry)  # type: ignore[no-any-return]
        return self._load_sync(key, loader, self._options(ttl, stale_ttl, tags, cache_none))  # type: ignore[no-any-return]

    def invalidate_tags(self, *tags: str) -> None:
        """Not available yet: entries carry their tags, but tag invalidation is not built."""
        raise NotImplementedError(
            "tag invalidation is not implemented in this version of cachelayer; "
            "entries record their tags, but only delete(*keys) removes entries for now"
        )

    def close(self) -> None:
        """Close the Redis clients this cache created (never ones it was given)."""
        self._clients.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- async API --------------------------------------------------------------------------

    async def aget(self, key: str, default: Any = None) -> Any:
        check_key(key)
        entry = await drive_async(read_through(self, key, None), self._async_tier, None)
        return default if entry is None else self._value(entry)

    async def aset(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        tags: Iterable[str] = (),
    ) -> None:
        check_key(key)
        entry, data = self._stored(key, value, ttl, stale_ttl, tags)
        if self._async_tier is not None:
            px = redis_px(entry, entry.stored_at)
            if px > 0:
                await self._async_tier.set(self._rkeys.value(key), data, px)
        self._keep(key, entry)

    async def adelete(self, *keys: str) -> None:
        for key in keys:
            self._l1.discard(check_key(key))
        if self._async_tier is not None and keys:
            await self._async_tier.delete([self._rkeys.value(k) for k in keys])

    async def aget_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        *,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        tags: Iterable[str] = (),
        cache_none: bool | None = None,
    ) -> T:
        entry = self._l1_fresh(check_key(key), self._clock())
        if entry is not None:
            return self._value(entry)  # type: ignore[no-any-return]
        opts = self._options(ttl, stale_ttl, tags, cache_none)
        return await self._load_async(key, loader, opts)  # type: ignore[no-any-return]

    async def ainvalidate_tags(self, *tags: str) -> None:
        self.invalidate_tags(*tags)

    async def aclose(self) -> None:
        await self._clients.aclose()

    async def __aenter__(self) -> Cache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- decorators and introspection -------------------------------------------------------

    def cached(
        self,
        *,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        key: str | Callable[..., str] | None = None,
        tags: Iterable[str] = (),
        cache_none: bool | None = None,
    ) -> Callable[[Callable[..., Any]], Any]:
        """Cache a function's (or coroutine function's) results; see ``cachelayer.cached``."""
        from ._decorators import cached

        return cached(self, ttl=ttl, stale_ttl=stale_ttl, key=key, tags=tags, cache_none=cache_none)

    def stats(self) -> dict[str, Any]:
        """A snapshot of this process's counters and tier state."""
        snap: dict[str, Any] = self._stats.as_dict()
        snap["l1_entries"] = len(self._l1)
        snap["l1_evictions"] = self._l1.evictions
        snap["loads_in_flight"] = self._flights.in_flight()
        snap["redis_healthy"] = self._health.healthy if self._has_l2 else None
        return snap
