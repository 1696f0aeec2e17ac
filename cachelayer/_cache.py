"""``Cache``: configuration, the sync and async entry points, and the helpers both share.

Every public method has an async twin with an ``a`` prefix and the same semantics. The helpers
prefixed ``_`` are the no-I/O steps of the read path (L1 lookup, accepting bytes from Redis,
preparing a loaded value for storage); ``_flow.read_through`` strings them together and the
drivers in ``_flow`` run it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

from ._bus import Bus
from ._clients import Clients
from ._codec import CorruptEntryError, Entry, encode_value, pack_entry, unpack_entry
from ._flight import Flights
from ._flow import drive_async, drive_sync, lookup, tag_snapshot
from ._guard import OriginGuard
from ._invalidate import Batch, Invalidator
from ._keys import RedisKeys, validate_namespace
from ._l1 import L1
from ._observe import NullObserver, Observer
from ._options import Loaded, Options, check_count, check_key
from ._policy import bound_for_l1, check_jitter, check_seconds, new_entry, redis_px
from ._read import ReadPath
from ._redis import BACKEND_ERRORS, FAILED, AsyncTier, BackendHealth, Change, SyncTier
from ._stats import Stats
from ._tags import TagVersions
from .exceptions import CacheError, ConfigurationError, SerializationError

log = logging.getLogger("cachelayer")

T = TypeVar("T")

__all__ = ["Cache", "Loaded"]


class Cache(ReadPath, Invalidator):
    """A read-through cache: in-process L1 in front of an optional Redis L2.

    Storage:
        redis: a URL (the cache then owns a sync and an asyncio client, made on first use), a
            client, or None for L1 only. URLs: ``redis://`` / ``rediss://`` / ``unix://``
            for one server, ``redis+sentinel://host:port[,host:port...]/service[/db]`` for
            a Sentinel-managed primary, ``redis+cluster://host:port[,host:port...]`` for a
            Redis Cluster. Clients: ``redis.Redis`` or ``redis.asyncio.Redis`` (also from
            ``Sentinel.master_for``), ``redis.cluster.RedisCluster`` or
            ``redis.asyncio.cluster.RedisCluster``.
        namespace: prefix of every Redis key; caches sharing a namespace share entries.
        l1_maxsize: entries kept in process; 0 disables L1.
        l1_ttl: cap, in seconds, on how long this process trusts its own copy of an entry.
        degraded_l1_ttl: while this process cannot hear invalidations (its subscription
            lost, as when Redis is unreachable, or not yet made), L1 drops what it had and
            keeps new entries at most this many seconds; 0 bypasses L1 entirely (every read
            then goes to Redis, or to the loader if Redis is down). An open circuit breaker
            alone does not count: L1 is kept as usual while the subscription holds.
        l1_copy: if True, L1 keeps encoded bytes and every caller gets its own decoded copy,
            so mutating a returned value can never affect another caller. If False (default,
            and much faster), callers in one process share the object L1 holds: treat
            returned values as read-only, as with ``functools.lru_cache``.
        cache_none: cache ``None`` results (a stored ``None`` is a hit, not a miss).

    Freshness:
        ttl: default seconds an entry is fresh.
        stale_ttl: default seconds after freshness during which a stale entry is served at
            once while one background refresh replaces it (stale-while-revalidate).
        max_stale: how stale an entry may be and still be served when the loader fails
            (fail-safe) or the origin is saturated; entries are kept that long. Default:
            ``stale_ttl``.
        jitter: fraction by which each TTL is spread, ``ttl * (1 ± jitter)``.
        early_refresh_beta: XFetch's beta; 0 disables early refresh of hot keys.

    Protecting the origin:
        lease: fleet-wide single-flight through Redis leases (per call: ``lease=False``).
        lease_ttl: seconds a lease holder has to load before another process takes over.
        soft_timeout: seconds after which a waiting caller gets stale data if any exists (the
            load goes on in the background).
        hard_timeout: seconds after which a waiting caller gets ``LoadTimeoutError``.
        fail_safe_throttle: seconds a key whose loader failed is served stale without
            retrying the loader.
        origin_limit: most loader calls at once (set it below the database pool size).
        origin_wait: seconds a load waits for a slot before it is shed.
        refresh_limit: most background refreshes at once (default: the limit less a reserve).

    Seeing it:
        metrics: an observer (``cachelayer.metrics.PrometheusMetrics``) that exports this
            cache's counters when scraped and times its loads; nothing is counted twice.

    Redis trouble:
        strict: raise ``BackendError`` / ``SerializationError`` on Redis trouble or corrupt
            bytes instead of failing open to the loader. An invalidation Redis did not take
            is queued and sent again all the same.
        redis_timeout: socket and connect timeout of owned clients, in seconds; also how long
            a call waits for a free pooled connection before failing open.
        redis_max_connections: connections in each owned client's pool (one sync pool, and
            one per event loop; on a Cluster, per node).
        invalidation_replicas: an invalidation counts as sent only once this many replicas
            have acknowledged it (Redis ``WAIT``, up to half of ``redis_timeout``); until then it
            stays queued and is sent again. Set it to 1 under Sentinel, so that a failover
            cannot lose a delete and let the promoted replica serve what it removed. Not
            supported on Cluster.
        breaker_threshold, breaker_cooldown: consecutive Redis failures that open the circuit,
            and seconds it stays open before one probe.

    Testing:
        clock: zero-argument callable returning wall-clock seconds (``time.time``).
        rng: ``random.Random`` used for jitter and early refresh (seed it in tests).
    """

    def __init__(
        self,
        redis: Any = None,
        *,
        namespace: str = "cachelayer",
        ttl: float = 60.0,
        stale_ttl: float = 0.0,
        max_stale: float | None = None,
        jitter: float = 0.1,
        l1_maxsize: int = 10_000,
        l1_ttl: float | None = None,
        l1_copy: bool = False,
        degraded_l1_ttl: float = 1.0,
        cache_none: bool = True,
        lease: bool = True,
        lease_ttl: float = 10.0,
        soft_timeout: float | None = None,
        hard_timeout: float | None = None,
        fail_safe_throttle: float = 5.0,
        early_refresh_beta: float = 1.0,
        origin_limit: int | None = None,
        origin_wait: float = 1.0,
        refresh_limit: int | None = None,
        metrics: Observer | None = None,
        strict: bool = False,
        redis_timeout: float = 0.25,
        redis_max_connections: int = 50,
        invalidation_replicas: int = 0,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 5.0,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        base = Options(60.0, 0.0, (), bool(cache_none), bool(lease))
        self._defaults = base.merged(
            ttl=ttl, stale_ttl=stale_ttl, soft_timeout=soft_timeout, hard_timeout=hard_timeout
        )
        self._max_stale = check_seconds("max_stale", max_stale, allow_zero=True, allow_none=True)
        if self._max_stale is None:
            self._max_stale = math.inf  # bounded by each entry's own grace
        self._grace_floor = 0.0 if max_stale is None else self._max_stale
        self._jitter = check_jitter(jitter)
        self._beta = check_seconds("early_refresh_beta", early_refresh_beta, allow_zero=True)
        self._l1_ttl = check_seconds("l1_ttl", l1_ttl, allow_zero=False, allow_none=True)
        self._lease_px = int(check_seconds("lease_ttl", lease_ttl, allow_zero=False) * 1000)
        self._throttle_seconds = check_seconds(
            "fail_safe_throttle", fail_safe_throttle, allow_zero=True
        )
        if clock is not None and not callable(clock):
            raise ConfigurationError(f"clock must be a zero-argument callable, got {clock!r}")
        self._clock: Callable[[], float] = clock or time.time
        self._rng = rng or random.Random()
        self._copy = bool(l1_copy)
        self._stats = Stats()
        self._l1 = L1(l1_maxsize, self._clock)
        if metrics is not None and not isinstance(metrics, Observer):
            raise ConfigurationError(f"metrics must be a metrics observer, got {metrics!r}")
        self._observer: Observer = metrics or NullObserver()
        self._guard = OriginGuard(
            origin_limit,
            check_seconds("origin_wait", origin_wait, allow_zero=True),
            refresh_limit,
            self._observer.origin_waited,
        )
        self._throttle = {}
        self._clients = Clients(
            redis,
            check_seconds("redis_timeout", redis_timeout, allow_zero=False),
            check_count("redis_max_connections", redis_max_connections, 1),
        )
        self._has_l2 = self._clients.enabled
        replicas = check_count("invalidation_replicas", invalidation_replicas, 0)
        if replicas and self._clients.cluster:
            raise ConfigurationError(
                "invalidation_replicas is not supported on Redis Cluster: WAIT would have to "
                "follow each node's writes on the same connection"
            )
        self._health = BackendHealth(
            strict=bool(strict),
            stats=self._stats,
            clock=self._clock,
            threshold=check_count("breaker_threshold", breaker_threshold, 1),
            cooldown=check_seconds("breaker_cooldown", breaker_cooldown, allow_zero=False),
        )
        self._strict = bool(strict)
        self._rkeys = RedisKeys(self.namespace)
        self._sync_tier = (
            SyncTier(self._clients, self._health, self._rkeys, replicas) if self._has_l2 else None
        )
        self._async_tier = (
            AsyncTier(self._clients, self._health, self._rkeys, replicas) if self._has_l2 else None
        )
        self._bus = Bus(self._clients.subscriber, self._rkeys.channel, self._has_l2)
        self._bus.handlers.append(self._on_message)
        self._flights = Flights()
        self._background = set()
        self._tag_versions = TagVersions(authoritative=not self._has_l2)
        self._callbacks = []
        self._pending = {}
        self._pending_lock = threading.Lock()
        self._queue_warned = False  # a WARNING said invalidations are queued; not yet sent
        self._unreleased: dict[str, tuple[str, float]] = {}
        self._warned: dict[str, set[str]] = {}
        # With Redis, L1 is trusted only while this process hears invalidations.
        self._l1.trusted = not self._has_l2
        self._l1.degraded_ttl = check_seconds("degraded_l1_ttl", degraded_l1_ttl, allow_zero=True)
        self._observer.bind(self)  # last: the observer may read anything above

    @property
    def clock(self) -> Callable[[], float]:
        """The wall clock this cache's entries are timed with (``time.time`` unless given)."""
        return self._clock

    def __repr__(self) -> str:
        tiers = "L1+Redis" if self._has_l2 else "L1"
        return f"<Cache namespace={self.namespace!r} {tiers} ttl={self._defaults.ttl}>"

    # --- shared steps of the read path (no I/O) -------------------------------------------

    def _options(
        self,
        ttl: Any = None,
        stale_ttl: Any = None,
        tags: Any = None,
        cache_none: bool | None = None,
        *,
        lease: bool | None = None,
        soft_timeout: float | None = None,
        hard_timeout: float | None = None,
    ) -> Options:
        return self._defaults.merged(
            ttl=ttl,
            stale_ttl=stale_ttl,
            tags=tags,
            cache_none=cache_none,
            lease=lease,
            soft_timeout=soft_timeout,
            hard_timeout=hard_timeout,
        )

    def _token(self) -> str:
        return secrets.token_hex(8)

    def _decode_l2(self, key: str, data: bytes | None) -> Entry | None:
        """Bytes read from Redis as an entry; corrupt or foreign bytes are a (logged) miss."""
        if data is None:
            return None
        try:
            return unpack_entry(data)
        except CorruptEntryError as exc:
            self._stats.corrupt_entries += 1
            self._warn_once("corrupt_entry", key, "treating undecodable bytes as a miss", exc)
            if self._strict:
                raise SerializationError(
                    f"corrupt entry under key {key!r}: {exc}", key=key
                ) from exc
            return None

    def _admit(
        self, key: str, entry: Entry, now: float, refresh_of: Entry | None, since: int
    ) -> Entry | None:
        """An entry from Redis still usable (fresh or within its grace, and newer than
        ``refresh_of`` if given) is kept in L1 and returned."""
        if now >= entry.stale_until:
            return None
        if refresh_of is not None and entry.stored_at <= refresh_of.stored_at:
            return None
        if now < entry.fresh_until:
            self._stats.l2_hits += 1
        self._keep(key, entry, now, since)
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
                self._warn_once("serialization_failed", key, "not caching the loaded value", exc)
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
            stale_ttl=max(opts.stale_ttl, self._grace_floor),
            jitter=self._jitter,
            rng=self._rng,
            load_time=load_time,
            tags=opts.tags,
        )

    def _keep(
        self, key: str, entry: Entry, now: float | None = None, since: int | None = None
    ) -> None:
        bound_for_l1(entry, entry.stored_at if now is None else now, self._l1_ttl, self._beta)
        # One representation per mode: shared objects, or bytes decoded per caller.
        if self._copy:
            entry.value = None
        else:
            entry.payload = None
        self._l1.put(key, entry, self._tags_hold, since)

    def _warn_once(self, event: str, key: str, what: str, detail: object) -> None:
        """One WARNING per key and kind of trouble (then DEBUG): a value that cannot be
        stored, or garbage under a key, would otherwise log on every request."""
        seen = self._warned.setdefault(event, set())
        if key in seen:
            log.debug("cachelayer: %s for %r: %s", what, key, detail)
            return
        if len(seen) >= 1000:
            seen.clear()
        seen.add(key)
        log.warning(
            "cachelayer: %s for %r: %s (further occurrences for this key at DEBUG)",
            what,
            key,
            detail,
            extra={"event": event, "key": key},
        )

    def _tags_hold(self, entry: Entry) -> bool:
        return self._tag_versions.current(entry.tags, entry.tag_versions)

    def _stored(
        self, key: str, value: Any, ttl: Any, stale_ttl: Any, tags: Any
    ) -> tuple[Entry, bytes, int]:
        """An entry for an explicit ``set``: unlike a load, an unencodable value raises."""
        opts = self._options(ttl, stale_ttl, tags)
        entry = self._new_entry(value, encode_value(value, key), self._clock(), 0.0, opts)
        return entry, pack_entry(entry), redis_px(entry, entry.stored_at)

    def _fresh_l1(self, key: str) -> Entry | None:
        entry = self._l1.data.get(check_key(key))
        if entry is not None and self._clock() < entry.l1_limit:
            entry.visited = True
            self._stats.l1_hits += 1
            return entry
        return None

    def _local_change(
        self,
        keys: list[str],
        expired: list[str],
        tags: list[str],
        batched: bool,
        written: list[tuple[str, bytes, int]],
    ) -> Change | None:
        """Apply an invalidation here; return what to send to Redis (None: nothing, or it
        joined a batch)."""
        if batched and self._batched(keys, expired, tags):
            return None
        overwritten = [k for k, _, _ in written]
        self._apply_local(keys + overwritten, expired, tags, self._clock(), self._bus.sender, True)
        if not self._has_l2:
            return None
        self._bus.start()
        return self._change(keys, expired, tags, written)

    def _reapply_local(self, change: Change) -> None:
        """Sweep L1 again once Redis has the change: a reader here that started after the
        first sweep could have found the old value still in Redis and kept it. (The echo of
        our own message is ignored, so nothing else would sweep it.) Written keys are left to
        ``set``, which keeps its new entry over whatever such a reader put there."""
        for key in change.deleted:
            self._l1.discard(key)
        for key in change.expired:
            self._l1.expire(key, change.now)
        if change.tags:
            self._tag_versions.forget(change.tags)
            self._l1.drop_tags(change.tags)

    def _invalidate_sync(
        self,
        keys: list[str],
        expired: list[str],
        tags: list[str],
        *,
        batched: bool = True,
        written: list[tuple[str, bytes, int]] | None = None,
    ) -> int:
        """Invalidate here and in Redis; returns L1's generation right after the local
        part (``set`` keeps its entry only if no other invalidation came after it)."""
        change = self._local_change(keys, expired, tags, batched, written or [])
        since = self._l1.generation
        if change is not None and self._sync_tier is not None:
            try:
                result = self._sync_tier.apply(change)
            except BaseException:
                # Strict mode raises instead of returning FAILED. The change carries every
                # invalidation that was queued before it: queue it all again, then raise.
                self._sent(change, FAILED)
                raise
            self._sent(change, result)
            self._reapply_local(change)
        return since

    async def _invalidate_async(
        self,
        keys: list[str],
        expired: list[str],
        tags: list[str],
        *,
        batched: bool = True,
        written: list[tuple[str, bytes, int]] | None = None,
    ) -> int:
        change = self._local_change(keys, expired, tags, batched, written or [])
        since = self._l1.generation
        if change is not None and self._async_tier is not None:
            try:
                result = await self._async_tier.apply(change)
            except BaseException:  # strict mode, or cancelled: as in _invalidate_sync
                self._sent(change, FAILED)
                raise
            self._sent(change, result)
            self._reapply_local(change)
        return since

    def _flush_pending(self) -> None:
        """Send queued invalidations from the listener thread once Redis is back."""
        # would_allow, not available: the flush's own call takes the half-open probe.
        if not (self._pending and self._sync_tier is not None and self._health.would_allow()):
            return
        try:
            client = self._clients.thread_client()
        except BACKEND_ERRORS:  # a Cluster client with no node to learn the layout from
            return
        change = self._change([], [], [], [])  # takes the whole queue: it must go back on failure
        try:
            result = self._sync_tier.apply_with(client, change)
        except CacheError:  # strict mode raises here too; nobody to raise to on this thread
            result = FAILED
        self._sent(change, result)

    def _release_later(self, key: str, token: str) -> None:
        """A lease whose release Redis did not take: try again from the listener thread,
        or the fleet waits out its TTL on a load that has finished."""
        self._unreleased[key] = (token, self._clock() + self._lease_px / 1000)

    def _release_leases(self) -> None:
        if self._sync_tier is None or not self._unreleased:
            return
        try:
            client = self._clients.thread_client()
        except BACKEND_ERRORS:  # a Cluster client with no node to learn the layout from
            return
        now = self._clock()
        for key, (token, until) in list(self._unreleased.items()):
            try:
                done = (
                    until <= now or self._sync_tier.release_with(client, key, token) is not FAILED
                )
            except CacheError:  # strict mode raises instead: the next tick tries again
                done = False
            if done and self._unreleased.get(key, (None,))[0] == token:
                del self._unreleased[key]

    # --- sync API ---------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The fresh value under ``key`` from L1 or Redis, else ``default``."""
        entry = self._fresh_l1(key)
        if entry is None and self._sync_tier is not None:
            self._bus.start()
            entry = drive_sync(lookup(self, key), self, None)
        if entry is None:
            self._stats.misses += 1
            return default
        return self._value(entry)

    def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        tags: Iterable[str] = (),
    ) -> None:
        """Store ``value`` in both tiers; raises ``SerializationError`` if it cannot be.

        Other processes drop their L1 copy, and a load of ``key`` already running (here or
        elsewhere) will not overwrite the new value: the write moves the key's fence.
        """
        entry, data, px = self._stored(check_key(key), value, ttl, stale_ttl, tags)
        if entry.tags:
            versions = drive_sync(tag_snapshot(self, entry.tags), self, None)
            if versions is None:  # Redis cannot say which versions hold: it is failing anyway
                log.warning("cachelayer: not storing %r: its tags' versions are unknown", key)
                return
            entry.tag_versions = versions
            data = pack_entry(entry)
        since = self._invalidate_sync([], [], [], batched=False, written=[(key, data, px)])
        # Kept only if no invalidation of the key arrived since our own write went out.
        self._keep(key, entry, None, since)

    def delete(self, *keys: str) -> None:
        """Remove entries from L1 and Redis, in every process; loads of them already running
        are fenced off."""
        self.invalidate(keys=keys)

    def expire(self, *keys: str) -> None:
        """Mark entries stale, in every process, rather than remove them.

        Unlike ``delete``, an expired entry can still be served within its grace: while a
        refresh runs (stale-while-revalidate), or when the loader fails (fail-safe).
        """
        self.invalidate(expire=keys)

    def invalidate_tags(self, *tags: str) -> None:
        """Stop serving every entry carrying any of ``tags``, in every process: one version
        bump per tag in Redis, however many entries carry it."""
        self.invalidate(tags=tags)

    def invalidate(
        self, *, keys: Iterable[str] = (), tags: Iterable[str] = (), expire: Iterable[str] = ()
    ) -> None:
        """Delete ``keys``, expire ``expire`` and invalidate ``tags`` in one round trip.

        L1 here is invalidated at once. If Redis cannot be reached the failure is logged and
        counted (raised in strict mode) and the invalidation is retried when it returns.
        """
        self._invalidate_sync(*self._parts(keys, expire, tags))

    def invalidation_batch(self) -> Batch:
        """``with cache.invalidation_batch():`` (or ``async with``) sends every invalidation
        made inside in one round trip when the block exits, and none if it raises."""
        return Batch(self)

    def get_or_load(
        self,
        key: str,
        loader: Callable[[], T],
        *,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        tags: Iterable[str] = (),
        cache_none: bool | None = None,
        lease: bool | None = None,
        soft_timeout: float | None = None,
        hard_timeout: float | None = None,
    ) -> T:
        """The cached value under ``key``; on a miss, ``loader()`` runs once per key across
        concurrent callers (in this process, and with leases across the fleet) and its result
        is stored in both tiers."""
        entry = self._l1.data.get(key)  # a hit pays for nothing below, options included
        if entry is not None and self._clock() < entry.l1_fresh:
            entry.visited = True
            self._stats.l1_hits += 1
            return self._value(entry)  # type: ignore[no-any-return]
        opts = self._options(
            ttl,
            stale_ttl,
            tags,
            cache_none,
            lease=lease,
            soft_timeout=soft_timeout,
            hard_timeout=hard_timeout,
        )
        self._bus.start()
        return self._load_sync(check_key(key), loader, opts)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the listener and close the Redis clients this cache created (never ones it
        was given)."""
        self._bus.close()
        self._clients.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- async API --------------------------------------------------------------------------

    async def aget(self, key: str, default: Any = None) -> Any:
        entry = self._fresh_l1(key)
        if entry is None and self._async_tier is not None:
            self._bus.start()
            entry = await drive_async(lookup(self, key), self, None)
        if entry is None:
            self._stats.misses += 1
            return default
        return self._value(entry)

    async def aset(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        tags: Iterable[str] = (),
    ) -> None:
        entry, data, px = self._stored(check_key(key), value, ttl, stale_ttl, tags)
        if entry.tags:
            versions = await drive_async(tag_snapshot(self, entry.tags), self, None)
            if versions is None:  # Redis cannot say which versions hold: it is failing anyway
                log.warning("cachelayer: not storing %r: its tags' versions are unknown", key)
                return
            entry.tag_versions = versions
            data = pack_entry(entry)
        since = await self._invalidate_async([], [], [], batched=False, written=[(key, data, px)])
        self._keep(key, entry, None, since)

    async def adelete(self, *keys: str) -> None:
        await self.ainvalidate(keys=keys)

    async def aexpire(self, *keys: str) -> None:
        await self.ainvalidate(expire=keys)

    async def ainvalidate_tags(self, *tags: str) -> None:
        await self.ainvalidate(tags=tags)

    async def ainvalidate(
        self, *, keys: Iterable[str] = (), tags: Iterable[str] = (), expire: Iterable[str] = ()
    ) -> None:
        await self._invalidate_async(*self._parts(keys, expire, tags))

    async def aget_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        *,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        tags: Iterable[str] = (),
        cache_none: bool | None = None,
        lease: bool | None = None,
        soft_timeout: float | None = None,
        hard_timeout: float | None = None,
    ) -> T:
        entry = self._l1.data.get(key)  # a hit pays for nothing below, options included
        if entry is not None and self._clock() < entry.l1_fresh:
            entry.visited = True
            self._stats.l1_hits += 1
            return self._value(entry)  # type: ignore[no-any-return]
        opts = self._options(
            ttl,
            stale_ttl,
            tags,
            cache_none,
            lease=lease,
            soft_timeout=soft_timeout,
            hard_timeout=hard_timeout,
        )
        self._bus.start()
        return await self._load_async(check_key(key), loader, opts)  # type: ignore[no-any-return]

    async def aclose(self, timeout: float = 2.0) -> None:
        """Close the listener and the clients the cache made (those it was given are yours).

        Loads and lease releases this event loop still runs for the cache (a load goes on
        when the caller that started it is cancelled: others may wait on it) get up to
        ``timeout`` seconds to end, then are cancelled; so they release their leases, and
        none reopens a client after this returns.
        """
        await self._settle(timeout)
        self._bus.close()
        await self._clients.aclose()

    async def _settle(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        cancelled = False
        while True:
            mine = [t for t in self._background if t.get_loop() is loop and not t.done()]
            left = deadline - loop.time()
            if not mine or (left <= 0 and cancelled):
                return
            if left <= 0:
                for task in mine:
                    task.cancel()
                # A cancelled load hands its lease on in a task of its own: a moment for it.
                cancelled, deadline = True, loop.time() + 1.0
                continue
            await asyncio.wait(mine, timeout=left)

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
        lease: bool | None = None,
        soft_timeout: float | None = None,
        hard_timeout: float | None = None,
    ) -> Callable[[Callable[..., Any]], Any]:
        """Cache a function's (or coroutine function's) results; see ``_decorators.cached``."""
        from ._decorators import cached

        opts = self._options(
            ttl,
            stale_ttl,
            tags,
            cache_none,
            lease=lease,
            soft_timeout=soft_timeout,
            hard_timeout=hard_timeout,
        )
        return cached(self, opts, key)

    def invalidates(
        self, *, keys: Iterable[str] = (), tags: Iterable[str] = (), expire: Iterable[str] = ()
    ) -> Callable[[Callable[..., Any]], Any]:
        """Invalidate ``keys``/``tags``/``expire`` (templates over the decorated function's
        arguments) after each call of it that returns without raising."""
        from ._decorators import invalidates

        return invalidates(self, keys, tags, expire)

    def stats(self) -> dict[str, Any]:
        """A snapshot of this process's counters and the state of its tiers and guard."""
        snap: dict[str, Any] = self._stats.as_dict()
        snap.update(self._guard.snapshot())
        snap["l1_entries"] = len(self._l1)
        snap["l1_evictions"] = self._l1.evictions
        snap["flights"] = len(self._flights)
        snap["redis_healthy"] = self._health.healthy if self._has_l2 else None
        snap["circuit_open"] = self._health.circuit_open if self._has_l2 else None
        snap["subscribed"] = self._bus.ready.is_set() if self._has_l2 else None
        return snap
