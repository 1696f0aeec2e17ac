"""The work of one flight, written once as a sans-I/O generator, and its two drivers.

``lead`` decides; it never touches the network or a lock. It yields small operations and is
sent their results; an error from an operation is thrown into it, so fail-safe lives here
once for both worlds:

    (GET, key)                        -> (envelope | None, fence, expired-at | None) | FAILED
    (TAGS, tags)                      -> [current version of each tag] | FAILED
    (ACQUIRE, key, token)             -> (taken, ms left on the holder's lease, waiter) | FAILED
    (WAIT, key, waiter, seconds)      -> "woken" | "poll" | "expired"
    (FILL, key, data, px, token, fence, write) -> 1 written | 0 refused | FAILED
    (SLOT, background)                -> True if the origin guard granted a load slot
    (LOAD,)                           -> (value, seconds the loader took)

``drive_sync`` and ``drive_async`` execute them and differ only by ``await``. Once a Redis
operation fails (or the circuit is open) the flow stops using Redis for the rest of the
flight, so one request pays at most one Redis timeout.

It returns ``(entry, how)``: ``how`` is None for a fresh entry, ``"fleet"`` for one another
process loaded while we waited on its lease, or the reason a stale entry is served
(``"swr"``, ``"fail_safe"``, ``"overload"``, ``"lease_timeout"``), or ``"skipped"`` for a
background refresh that found nothing to do.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

from ._codec import Entry, pack_entry
from ._policy import redis_px
from ._redis import FAILED
from .exceptions import OriginOverloadedError

if TYPE_CHECKING:
    from ._cache import Cache
    from ._flight import Flight
    from ._options import Options

GET, ACQUIRE, WAIT, FILL, SLOT, LOAD, TAGS = range(7)
_POLL = 0.05  # seconds between looks at Redis while the pub/sub subscription is down
# Seconds a lease waiter trusts the fill message to come. The holder may never send it: on a
# Cluster, the node holding the lease can die while this process stays subscribed through
# another node, and the lease then lives on only in this waiter's mind until its TTL.
LEASE_RECHECK = 0.5

Op = tuple[Any, ...]
R = TypeVar("R")
Result = tuple[Entry, "str | None"]
Flow = Generator[Op, Any, Result]


def _newer(a: Entry | None, b: Entry | None) -> Entry | None:
    if a is None:
        return b
    return a if b is None or a.stored_at >= b.stored_at else b


def tag_snapshot(
    cache: Cache, tags: tuple[str, ...], use_redis: bool = True
) -> Generator[Op, Any, tuple[int, ...] | None]:
    """The current versions of ``tags``: known here, or asked of Redis (None if it fails, or
    if this request already stopped using Redis)."""
    versions = cache._tag_versions
    known = versions.known(tags)
    if known is not None or not tags:
        return known or ()
    if not use_redis:
        return None
    generation = versions.generation
    got = yield (TAGS, tags)
    if got is FAILED:
        return None
    versions.learn(tags, got, generation)
    return tuple(got)


def from_l2(
    cache: Cache, key: str, got: Any, refresh_of: Entry | None, since: int
) -> Generator[Op, Any, Entry | None]:
    """An entry read from Redis that still stands: decodable, its tags' versions unchanged,
    not expired before it was written, within its grace (and newer than ``refresh_of``)."""
    data, _, expired_at = got
    entry = cache._decode_l2(key, data)
    if entry is None:
        return None
    if entry.tags and (yield from tag_snapshot(cache, entry.tags)) != entry.tag_versions:
        return None  # a tag it carries was invalidated after it was loaded
    if expired_at is not None and entry.stored_at <= expired_at:
        entry.fresh_until = min(entry.fresh_until, expired_at)
    return cache._admit(key, entry, cache._clock(), refresh_of, since)


def lookup(cache: Cache, key: str) -> Generator[Op, Any, Entry | None]:
    """``get``: a fresh entry from L1 or Redis, never a load."""
    since = cache._l1.generation
    got = yield (GET, key)
    if got is FAILED:
        return None
    entry = yield from from_l2(cache, key, got, None, since)
    return entry if entry is not None and cache._clock() < entry.fresh_until else None


def _release(
    cache: Cache, flight: Flight, key: str, token: str, fence: str
) -> Generator[Op, Any, None]:
    """Give up a lease without writing, waking any process waiting on it."""
    flight.lease = None
    if token:
        try:
            got = yield (FILL, key, b"", 0, token, fence, False)
        except BaseException:  # strict mode raises (or the flight is torn down): retry too
            cache._release_later(key, token)
            raise
        if got is FAILED:
            cache._release_later(key, token)


def lead(cache: Cache, key: str, opts: Options, flight: Flight, refresh_of: Entry | None) -> Flow:
    """Load ``key`` once for every waiter of ``flight`` (or refresh ``refresh_of``)."""
    now = cache._clock()
    stale = refresh_of
    if refresh_of is None:
        entry = cache._l1.data.get(key)
        if entry is not None:
            if now < entry.l1_limit:  # the flight we queued behind may just have filled it
                return entry, None
            if now < entry.l1_expires:
                stale = entry
    use_redis = cache._has_l2
    fence = ""
    if use_redis:
        got = yield (GET, key)
        if got is FAILED:
            use_redis = False
        else:
            fence = got[1]
            found = yield from from_l2(cache, key, got, refresh_of, flight.since)
            if found is not None and now < found.fresh_until:
                return found, None
            stale = _newer(stale, found)
    flight.stale = stale
    if refresh_of is None and stale is not None and cache._swr_allows(stale, now, opts):
        return stale, "swr"

    token = orphan = ""
    if use_redis and opts.lease:
        token = cache._token()
        while True:
            got = yield (ACQUIRE, key, token)
            if got is FAILED:
                # Redis may have taken the lease and only the answer been lost (a
                # connection dropped mid-reply): release it after the load, best effort,
                # or the whole fleet waits out its TTL on a lease nobody holds. The runner
                # releases it too if the load is aborted (cancelled, or a BaseException).
                use_redis, token, orphan = False, "", token
                flight.lease = (orphan, fence)
                break
            taken, pttl, waiter = got
            if taken:
                flight.lease = (token, fence)  # released by any FILL, or on abort by the runner
                break
            if refresh_of is not None:  # another process is refreshing it: nothing to do
                return refresh_of, "skipped"
            cache._stats.lease_waits += 1
            left = pttl / 1000 + 0.01
            how = yield (WAIT, key, waiter, min(left, LEASE_RECHECK))
            if how == "expired" and left > LEASE_RECHECK:
                how = "poll"  # not the lease's end: time to look again
            got = yield (GET, key)
            if got is FAILED:
                use_redis, token = False, ""
                break
            fence = got[1]
            found = yield from from_l2(cache, key, got, None, flight.since)
            if found is not None and cache._clock() < found.fresh_until:
                cache._stats.fleet_coalesced += 1
                return found, "fleet"
            stale = flight.stale = _newer(stale, found)
            if how == "expired" and stale is not None:
                return stale, "lease_timeout"
            # The holder died or gave up: its lease expired with nothing to show. Race for
            # the lease again; exactly one waiter wins it, the rest go back to waiting.

    # Tag versions as of before the load, and before taking a slot: nothing between the
    # slot and its release may be left half-done by a cancellation.
    versions = yield from tag_snapshot(cache, opts.tags, use_redis)
    background = refresh_of is not None
    if not (yield (SLOT, background)):
        yield from _release(cache, flight, key, token or orphan, fence)  # hand the lease on
        if background:
            return refresh_of, "skipped"  # type: ignore[return-value]
        if stale is not None and cache._duress_allows(stale, cache._clock()):
            return stale, "overload"
        cache._stats.loads_shed += 1
        raise OriginOverloadedError(
            f"no origin slot for {key!r} within {cache._guard.wait}s "
            f"({cache._guard.limit} loads already running)"
        )
    cache._stats.loads += 1
    started = time.perf_counter()
    try:
        try:
            value, load_time = yield (LOAD,)
        finally:
            cache._guard.release(background)
    except Exception as exc:
        cache._observer.load_finished(time.perf_counter() - started, "error")
        cache._guard.record(True)
        cache._stats.load_errors += 1
        yield from _release(cache, flight, key, token or orphan, fence)
        if stale is not None and cache._duress_allows(stale, cache._clock()):
            cache._engage_fail_safe(key, exc)
            return stale, "fail_safe"
        raise
    cache._guard.record(False)
    cache._observer.load_finished(load_time, "success")

    entry = cache._prepare(key, value, load_time, opts)
    if entry.tags != opts.tags:  # the loader chose its tags (Loaded): versions as of now
        versions = yield from tag_snapshot(cache, entry.tags, use_redis)
    if versions is None:  # tag versions unknown: the entry could never be checked
        entry.payload = None
    entry.tag_versions = versions or ()
    if entry.payload is None:  # not storable: hand it over, store nothing
        yield from _release(cache, flight, key, token or orphan, fence)
        return entry, None
    written = True
    if use_redis:
        px = redis_px(entry, entry.stored_at)
        flight.lease = None  # the fill releases it
        try:
            got = yield (FILL, key, pack_entry(entry), px, token, fence, px > 0)
        except BaseException:  # as in _release
            if token:
                cache._release_later(key, token)
            raise
        if got is FAILED and token:
            cache._release_later(key, token)
        if got == 0:  # invalidated while we loaded: this value must not come back
            written = False
            cache._stats.fenced_writes += 1
    elif orphan:
        yield from _release(cache, flight, key, orphan, fence)
    if written and not flight.invalidated:
        cache._keep(key, entry, None, flight.since)
    return entry, None


def drive_sync(flow: Generator[Op, Any, R], cache: Cache, loader: Callable[[], Any] | None) -> R:
    tier = cache._sync_tier
    try:
        op = next(flow)
        while True:
            try:
                code = op[0]
                if code == GET:
                    cache._bus.start()
                    result: Any = tier.read(op[1])  # type: ignore[union-attr]
                elif code == ACQUIRE:
                    waiter = threading.Event()
                    cache._bus.expect(op[1], waiter)
                    result = tier.acquire(op[1], op[2], cache._lease_px)  # type: ignore[union-attr]
                    if result is FAILED or result[0]:
                        cache._bus.forget(op[1], waiter)
                    if result is not FAILED:
                        result = (bool(result[0]), result[1], waiter)
                elif code == WAIT:
                    _, key, waiter, seconds = op
                    ready = cache._bus.ready.is_set()
                    woken = waiter.wait(seconds if ready else min(seconds, _POLL))
                    cache._bus.forget(key, waiter)
                    result = (
                        "woken" if woken else "expired" if ready or seconds <= _POLL else "poll"
                    )
                elif code == FILL:
                    result = tier.fill(*op[1:])  # type: ignore[union-attr]
                elif code == TAGS:
                    result = tier.tag_versions(op[1])  # type: ignore[union-attr]
                elif code == SLOT:
                    guard = cache._guard
                    result = guard.try_acquire(True) if op[1] else guard.acquire_sync()
                else:
                    started = time.perf_counter()
                    result = (loader(), time.perf_counter() - started)  # type: ignore[misc]
            except Exception as exc:
                op = flow.throw(exc)
            else:
                op = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        flow.close()  # cancelled or interrupted mid-operation: run the flow's cleanups now


async def drive_async(
    flow: Generator[Op, Any, R], cache: Cache, loader: Callable[[], Awaitable[Any]] | None
) -> R:
    tier = cache._async_tier
    try:
        op = next(flow)
        while True:
            try:
                code = op[0]
                if code == GET:
                    cache._bus.start()
                    result: Any = await tier.read(op[1])  # type: ignore[union-attr]
                elif code == ACQUIRE:
                    loop = asyncio.get_running_loop()
                    waiter = (loop, loop.create_future())
                    cache._bus.expect(op[1], waiter)
                    result = await tier.acquire(op[1], op[2], cache._lease_px)  # type: ignore[union-attr]
                    if result is FAILED or result[0]:
                        cache._bus.forget(op[1], waiter)
                    if result is not FAILED:
                        result = (bool(result[0]), result[1], waiter)
                elif code == WAIT:
                    _, key, (_, fut), seconds = op
                    ready = cache._bus.ready.is_set()
                    try:
                        done, _ = await asyncio.wait(
                            (fut,), timeout=seconds if ready else min(seconds, _POLL)
                        )
                    finally:  # cancelled too: leave no waiter registered behind
                        cache._bus.forget(key, op[2])
                    result = "woken" if done else "expired" if ready or seconds <= _POLL else "poll"
                elif code == FILL:
                    result = await tier.fill(*op[1:])  # type: ignore[union-attr]
                elif code == TAGS:
                    result = await tier.tag_versions(op[1])  # type: ignore[union-attr]
                elif code == SLOT:
                    guard = cache._guard
                    result = guard.try_acquire(True) if op[1] else await guard.acquire_async()
                else:
                    started = time.perf_counter()
                    result = (await loader(), time.perf_counter() - started)  # type: ignore[misc]
            except Exception as exc:
                op = flow.throw(exc)
            else:
                op = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        flow.close()  # cancelled or interrupted mid-operation: run the flow's cleanups now
