"""Serving stale on purpose, timeouts, early refresh and the origin guard.

Freshness runs on a FakeClock; only loaders that must really overlap or outlast a timeout
take real (short) time. Each behaviour runs through the sync and the async API.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import SyncAPI

from cachelayer import Cache, CacheError, LoadTimeoutError, OriginOverloadedError
from cachelayer._codec import Entry
from cachelayer._policy import XFETCH_SPAN
from cachelayer.testing import FakeClock

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]


@pytest.fixture(params=["l1", "l1+redis"])
def tiers(request: pytest.FixtureRequest, redis_url: str) -> str | None:
    return None if request.param == "l1" else redis_url


class Versions:
    """A loader returning v1, v2, ...; it can be made slow or failing."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self.error: Exception | None = None
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def __call__(self) -> str:
        with self.lock:
            self.calls += 1
            n = self.calls
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.error is not None:
                raise self.error
            return f"v{n}"
        finally:
            with self.lock:
                self.running -= 1


def test_stale_while_revalidate_serves_stale_at_once_and_refreshes_once(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    clock = FakeClock()
    cache = make_cache(tiers, clock=clock, ttl=10, stale_ttl=60)
    load = Versions()
    assert api.get_or_load(cache, "k", load) == "v1"
    clock.advance(15)
    load.delay = 0.3  # the refresh takes a while; callers meanwhile must not wait for it
    started = time.monotonic()
    for _ in range(20):  # all inside the grace: every caller gets v1 at once
        assert api.get_or_load(cache, "k", load) == "v1"
    assert time.monotonic() - started < 0.25
    api.settle(cache)
    assert load.calls == 2  # one background refresh for twenty stale reads
    assert api.get_or_load(cache, "k", load) == "v2"
    assert cache.stats()["stale_swr"] == 20
    assert cache.stats()["refreshes"] == 1


def test_past_the_grace_a_caller_waits_for_the_load(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    clock = FakeClock()
    cache = make_cache(tiers, clock=clock, ttl=10, stale_ttl=5)
    load = Versions()
    api.get_or_load(cache, "k", load)
    clock.advance(16)
    assert api.get_or_load(cache, "k", load) == "v2"


def test_fail_safe_serves_stale_and_throttles_the_failing_loader(
    api: SyncAPI,
    make_cache: Callable[..., Cache],
    tiers: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    cache = make_cache(tiers, clock=clock, ttl=10, max_stale=600, fail_safe_throttle=30)
    load = Versions()
    api.get_or_load(cache, "k", load)
    clock.advance(20)  # expired; no stale-while-revalidate (stale_ttl=0)
    load.error = ConnectionError("database down")
    with caplog.at_level(logging.WARNING, logger="cachelayer"):
        assert api.get_or_load(cache, "k", load) == "v1"
        assert api.get_or_load(cache, "k", load) == "v1"  # throttled: loader not called
    assert load.calls == 2
    assert "fail-safe engaged" in caplog.text
    assert caplog.text.count("fail-safe engaged") == 1
    assert cache.stats()["stale_fail_safe"] == 2
    clock.advance(31)  # throttle over: the loader is tried again
    load.error = None
    assert api.get_or_load(cache, "k", load) == "v3"


def test_without_anything_stale_a_failing_loader_still_raises(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    cache = make_cache(tiers, max_stale=600)
    load = Versions()
    load.error = ConnectionError("database down")
    with pytest.raises(ConnectionError):
        api.get_or_load(cache, "k", load)


def test_soft_timeout_serves_stale_and_the_load_still_lands(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    clock = FakeClock()
    cache = make_cache(tiers, clock=clock, ttl=10, max_stale=600)
    load = Versions(delay=0.3)
    api.get_or_load(cache, "k", load)
    clock.advance(20)
    started = time.monotonic()
    assert api.get_or_load(cache, "k", load, soft_timeout=0.05) == "v1"
    assert time.monotonic() - started < 0.25
    api.settle(cache)
    assert api.get_or_load(cache, "k", load) == "v2"  # the slow load finished and was stored
    assert cache.stats()["stale_soft_timeout"] == 1


def test_hard_timeout_raises_a_timeout_error_and_the_load_fills_the_cache(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    cache = make_cache(tiers)
    load = Versions(delay=0.3)
    started = time.monotonic()
    with pytest.raises(LoadTimeoutError) as info:
        api.get_or_load(cache, "k", load, hard_timeout=0.05)
    assert time.monotonic() - started < 0.25
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, CacheError)
    api.settle(cache)
    assert api.get(cache, "k") == "v1"
    assert cache.stats()["load_timeouts"] == 1


def test_soft_without_stale_waits_until_the_hard_timeout(
    api: SyncAPI, make_cache: Callable[..., Cache]
) -> None:
    cache = make_cache()
    load = Versions(delay=0.1)
    assert api.get_or_load(cache, "k", load, soft_timeout=0.02, hard_timeout=2) == "v1"


def test_timeouts_are_validated(make_cache: Callable[..., Cache]) -> None:
    from cachelayer import ConfigurationError

    with pytest.raises(ConfigurationError, match="soft_timeout"):
        make_cache(soft_timeout=2, hard_timeout=1)
    with pytest.raises(ConfigurationError, match="hard_timeout"):
        make_cache().get_or_load("k", lambda: 1, hard_timeout=-1)


# --- early refresh (XFetch) -----------------------------------------------------------------


def _entry_in_l1(cache: Cache, clock: FakeClock, load_time: float, ttl: float) -> Entry:
    cache.set("hot", "v0", ttl=ttl)
    entry = cache._l1.data["hot"]
    entry.load_time = load_time
    from cachelayer._policy import bound_for_l1

    bound_for_l1(entry, clock(), None, cache._beta)
    return entry


@pytest.mark.parametrize("beta", [1.0, 2.0])
@pytest.mark.parametrize("before_expiry", [0.2, 1.0, 3.0])
def test_early_refresh_follows_the_xfetch_formula(beta: float, before_expiry: float) -> None:
    clock = FakeClock()
    cache = Cache(clock=clock, jitter=0, early_refresh_beta=beta, rng=random.Random(1234))
    entry = _entry_in_l1(cache, clock, load_time=1.0, ttl=100)
    clock.set(entry.fresh_until - before_expiry)
    trials = 20_000
    fired = sum(cache._early(entry, clock()) for _ in range(trials))
    expected = math.exp(-before_expiry / (1.0 * beta))  # P(-delta*beta*ln(U) >= gap)
    sigma = math.sqrt(expected * (1 - expected) / trials)
    assert abs(fired / trials - expected) < 5 * sigma + 1e-4


def test_far_from_expiry_the_hot_path_answers_alone() -> None:
    clock = FakeClock()
    cache = Cache(clock=clock, jitter=0, early_refresh_beta=1.0)
    entry = _entry_in_l1(cache, clock, load_time=0.5, ttl=100)
    assert entry.l1_fresh == pytest.approx(entry.fresh_until - XFETCH_SPAN * 0.5)
    clock.set(entry.l1_fresh - 0.001)
    assert not cache._early(entry, clock())


def test_an_early_refresh_replaces_a_hot_entry_before_it_expires(
    api: SyncAPI, make_cache: Callable[..., Cache]
) -> None:
    clock = FakeClock()
    cache = make_cache(clock=clock, ttl=100, rng=random.Random(7))
    load = Versions()
    api.get_or_load(cache, "k", load)
    entry = cache._l1.data["k"]
    entry.load_time = 1.0  # pretend the query took a second
    entry.l1_fresh = entry.fresh_until - XFETCH_SPAN
    clock.set(entry.fresh_until - 0.01)  # almost certain to fire
    assert api.get_or_load(cache, "k", load) == "v1"  # served at once...
    api.settle(cache)
    assert api.get_or_load(cache, "k", load) == "v2"  # ...and replaced before expiry
    assert cache.stats()["early_refreshes"] == 1


# --- the origin guard -----------------------------------------------------------------------


def test_the_guard_caps_concurrent_loads_and_sheds_the_rest_fast(redis_url: str) -> None:
    cache = Cache(origin_limit=2, origin_wait=0.1, jitter=0)
    load = Versions(delay=0.4)
    outcomes: list[Any] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        started = time.monotonic()
        try:
            value: Any = cache.get_or_load(f"k{i}", load)
        except OriginOverloadedError as exc:
            value = exc
        with lock:
            outcomes.append((value, time.monotonic() - started))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert load.peak == 2  # never more than the limit at the database
    shed = [t for v, t in outcomes if isinstance(v, OriginOverloadedError)]
    assert len(shed) == 6
    assert all(t < 0.35 for t in shed)  # failed fast, not after queueing behind the loads
    assert cache.stats()["loads_shed"] == 6
    assert isinstance(OriginOverloadedError("x"), CacheError)


def test_a_saturated_origin_serves_stale_instead_of_shedding(
    api: SyncAPI, make_cache: Callable[..., Cache]
) -> None:
    clock = FakeClock()
    cache = make_cache(clock=clock, ttl=10, max_stale=600, origin_limit=1, origin_wait=0.05)
    load = Versions()
    api.get_or_load(cache, "k", load)
    clock.advance(20)
    assert cache._guard.try_acquire()  # something else holds the only slot
    try:
        assert api.get_or_load(cache, "k", load) == "v1"
        assert load.calls == 1
        assert cache.stats()["stale_overload"] == 1
    finally:
        cache._guard.release()
    assert api.get_or_load(cache, "k", load) == "v2"  # pressure gone: normal freshness


def test_background_refreshes_never_take_the_last_slots() -> None:
    cache = Cache(origin_limit=5)
    guard = cache._guard
    assert guard.reserve == 1
    taken = [guard.try_acquire(background=True) for _ in range(10)]
    assert sum(taken) == 4  # one slot always left for a caller who waits
    assert guard.try_acquire()
    assert not guard.try_acquire()


def test_early_refreshes_pause_under_pressure() -> None:
    clock = FakeClock()
    cache = Cache(clock=clock, jitter=0, origin_limit=1, rng=random.Random(3))
    entry = _entry_in_l1(cache, clock, load_time=1.0, ttl=100)
    clock.set(entry.fresh_until - 0.001)
    assert cache._early(entry, clock())
    assert cache._guard.try_acquire()
    assert not cache._early(entry, clock())
    cache._guard.release()


def test_async_waiters_for_a_slot_are_served_in_turn() -> None:
    cache = Cache(origin_limit=1, origin_wait=2, jitter=0)
    running = 0
    peak = 0

    async def load() -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return 1

    async def main() -> list[int]:
        return await asyncio.gather(*(cache.aget_or_load(f"k{i}", load) for i in range(10)))

    assert asyncio.run(main()) == [1] * 10
    assert peak == 1
    assert cache.stats()["loads_in_flight"] == 0
