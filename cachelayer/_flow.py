"""The read-through algorithm, written once as a sans-I/O generator, and its two drivers.

``read_through`` decides; it never touches the network. It yields small operations
(``(GET, rkey)``, ``(SET, rkey, data, px)``, ``(LOAD,)``) and is sent their results; errors
from an operation are thrown into it, so policies such as fail-safe can live here once.
``drive_sync`` and ``drive_async`` execute the operations and differ only by ``await``.

The hit path never gets here: callers check the in-process tier first and only a miss pays
for the generator. The flow checks L1 again anyway because it runs inside the single-flight,
and the flight that just finished may have filled it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any

from ._codec import Entry, pack_entry
from ._policy import redis_px

if TYPE_CHECKING:
    from ._cache import Cache, Options
    from ._redis import AsyncTier, SyncTier

GET, SET, LOAD = 0, 1, 2

Op = tuple[Any, ...]
Flow = Generator[Op, Any, "Entry | None"]


def read_through(cache: Cache, key: str, opts: Options | None) -> Flow:
    """Find ``key`` fresh in L1 or L2; failing that, load it (unless ``opts`` is None, which
    means look up only) and store it in both tiers."""
    now = cache._clock()
    entry = cache._l1_fresh(key, now)
    if entry is not None:
        return entry
    rkey = cache._rkeys.value(key) if cache._has_l2 else ""
    if rkey:
        data = yield (GET, rkey)
        if data is not None:
            entry = cache._accept_l2(key, data, now)
            if entry is not None:
                return entry
    cache._stats.misses += 1
    if opts is None:
        return None
    cache._stats.loads += 1
    try:
        value, load_time = yield (LOAD,)
    except Exception:
        cache._stats.load_errors += 1
        raise
    entry = cache._prepare(key, value, load_time, opts)
    if entry.payload is not None:
        if rkey:
            px = redis_px(entry, entry.stored_at)
            if px > 0:
                yield (SET, rkey, pack_entry(entry), px)
        cache._keep(key, entry)
    return entry


def drive_sync(flow: Flow, tier: SyncTier | None, loader: Callable[[], Any] | None) -> Any:
    try:
        cache_op = next(flow)
        while True:
            try:
                code = cache_op[0]
                if code == GET:
                    assert tier is not None
                    result: Any = tier.get(cache_op[1])
                elif code == SET:
                    assert tier is not None
                    tier.set(cache_op[1], cache_op[2], cache_op[3])
                    result = None
                else:
                    assert loader is not None
                    started = time.perf_counter()
                    result = (loader(), time.perf_counter() - started)
            except Exception as exc:
                cache_op = flow.throw(exc)
            else:
                cache_op = flow.send(result)
    except StopIteration as stop:
        return stop.value


async def drive_async(
    flow: Flow, tier: AsyncTier | None, loader: Callable[[], Awaitable[Any]] | None
) -> Any:
    try:
        cache_op = next(flow)
        while True:
            try:
                code = cache_op[0]
                if code == GET:
                    assert tier is not None
                    result: Any = await tier.get(cache_op[1])
                elif code == SET:
                    assert tier is not None
                    await tier.set(cache_op[1], cache_op[2], cache_op[3])
                    result = None
                else:
                    assert loader is not None
                    started = time.perf_counter()
                    result = (await loader(), time.perf_counter() - started)
            except Exception as exc:
                cache_op = flow.throw(exc)
            else:
                cache_op = flow.send(result)
    except StopIteration as stop:
        return stop.value
