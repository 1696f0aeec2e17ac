"""Redis trouble never takes the application down: real failures, bounded time."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
import redis
from conftest import subscribed, wait_for
from proxy import Proxy

from cachelayer import BackendError, Cache
from cachelayer.testing import RedisServer

pytestmark = pytest.mark.redis

TIMEOUT = 0.25  # the cache's redis_timeout in these tests
# A call makes at most two Redis round trips (GET, then SET after a load), each bounded by
# the timeout; anything near this bound means a retry or a hang crept in.
BOUND = 2 * TIMEOUT + 0.5


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return f"loaded-{self.calls}"


def timed(fn: Any) -> tuple[Any, float]:
    start = time.monotonic()
    value = fn()
    return value, time.monotonic() - start


def test_a_stopped_server_falls_through_to_the_loader_quickly(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cache = Cache(own_redis.url, redis_timeout=TIMEOUT, jitter=0)
    loader = Counter()
    assert cache.get_or_load("a", loader) == "loaded-1"
    own_redis.stop()
    with caplog.at_level(logging.INFO, logger="cachelayer"):
        for i in range(20):
            value, took = timed(lambda i=i: cache.get_or_load(f"k{i}", loader))
            assert value.startswith("loaded-")
            assert took < BOUND
        wait_for(lambda: cache.stats()["subscribed"] is False)
        # Deaf to invalidations, the process dropped its L1; it reloads "a" once and keeps
        # it briefly (degraded_l1_ttl), so the database is not hit on every request.
        again = cache.get_or_load("a", loader)
        assert cache.get_or_load("a", loader) == again
    stats = cache.stats()
    # Three failures open the circuit; after that no request even tries Redis.
    assert stats["backend_errors"] == 3
    assert stats["breaker_skips"] >= 17
    assert stats["circuit_open"] is True
    # One line per change of state (redis failed, circuit opened, subscription lost), not
    # one per request.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) <= 4, warnings
    assert len(set(warnings)) == len(warnings)
    cache.close()


def test_the_cache_recovers_when_the_server_comes_back_empty(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cache = Cache(own_redis.url, redis_timeout=TIMEOUT, jitter=0, l1_maxsize=0)
    loader = Counter()
    cache.get_or_load("k", loader)
    own_redis.stop()
    cache.get_or_load("k", loader)
    own_redis.start()  # same port, no data: a real restart
    with caplog.at_level(logging.INFO, logger="cachelayer"):
        cache.get_or_load("k", loader)
        assert cache.get_or_load("k", loader) == "loaded-3"
    assert loader.calls == 3
    assert cache.stats()["redis_healthy"] is True
    assert "reachable again" in caplog.text
    cache.close()


def test_a_blackholed_server_costs_each_call_at_most_the_timeout(own_redis: RedisServer) -> None:
    with Proxy(own_redis.port) as proxy:
        cache = Cache(proxy.url, redis_timeout=TIMEOUT, jitter=0)
        loader = Counter()
        cache.get_or_load("warm", loader)
        proxy.set_mode("blackhole")
        for i in range(5):
            value, took = timed(lambda i=i: cache.get_or_load(f"k{i}", loader))
            assert value.startswith("loaded-")
            assert took < BOUND
        proxy.set_mode("pass")
        cache.close()


def test_a_slow_server_within_the_timeout_is_still_used(own_redis: RedisServer) -> None:
    with Proxy(own_redis.port) as proxy:
        cache = Cache(proxy.url, redis_timeout=TIMEOUT, jitter=0, l1_maxsize=0)
        loader = Counter()
        cache.get_or_load("k", loader)
        proxy.set_mode("delay", 0.05)
        assert cache.get_or_load("k", loader) == "loaded-1"
        assert cache.stats()["backend_errors"] == 0
        cache.close()


def test_connections_dropped_mid_run_fall_through(own_redis: RedisServer) -> None:
    with Proxy(own_redis.port) as proxy:
        cache = Cache(proxy.url, redis_timeout=TIMEOUT, jitter=0, l1_maxsize=0)
        loader = Counter()
        cache.get_or_load("k", loader)
        proxy.set_mode("drop")
        value, took = timed(lambda: cache.get_or_load("k", loader))
        assert value == "loaded-2" and took < BOUND
        proxy.set_mode("pass")
        # Redis is used again: it still holds the first load's fresh entry.
        assert cache.get_or_load("k", loader) == "loaded-1"
        assert loader.calls == 2
        cache.close()


def test_async_callers_fall_through_too_and_stay_single_flight(own_redis: RedisServer) -> None:
    cache = Cache(own_redis.url, redis_timeout=TIMEOUT, jitter=0)
    own_redis.stop()
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return "v"

    async def main() -> list[Any]:
        out = await asyncio.gather(*(cache.aget_or_load("k", load) for _ in range(200)))
        await cache.aclose()
        return out

    start = time.monotonic()
    assert asyncio.run(main()) == ["v"] * 200
    assert time.monotonic() - start < BOUND + 0.05
    assert calls == 1


def test_threads_while_redis_is_away_load_once_per_key(own_redis: RedisServer) -> None:
    cache = Cache(own_redis.url, redis_timeout=TIMEOUT, jitter=0)
    own_redis.stop()
    calls = 0
    lock = threading.Lock()

    def load() -> str:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.1)
        return "v"

    barrier = threading.Barrier(20)
    results: list[str] = []

    def call() -> None:
        barrier.wait()
        results.append(cache.get_or_load("k", load))

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["v"] * 20 and calls == 1
    cache.close()


def test_strict_caches_raise_backend_errors_with_the_cause(own_redis: RedisServer) -> None:
    cache = Cache(own_redis.url, redis_timeout=TIMEOUT, strict=True)
    own_redis.stop()
    with pytest.raises(BackendError) as info:
        cache.get_or_load("k", lambda: 1)
    assert isinstance(info.value.__cause__, redis.RedisError)
    cache.close()


def test_owned_clients_use_hiredis_and_do_not_retry() -> None:
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE
    cache = Cache("redis://127.0.0.1:1/0", redis_timeout=TIMEOUT)
    client = cache._clients.sync_client()
    kwargs = client.get_connection_kwargs()
    assert kwargs["retry"].get_retries() == 0
    assert kwargs["socket_timeout"] == TIMEOUT
    cache.close()


def test_the_circuit_opens_skips_redis_and_closes_after_a_good_probe(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from cachelayer.testing import FakeClock

    clock = FakeClock()
    cache = Cache(
        own_redis.url,
        clock=clock,
        jitter=0,
        l1_maxsize=0,
        breaker_threshold=3,
        breaker_cooldown=10,
        redis_timeout=TIMEOUT,
    )
    loader = Counter()
    own_redis.stop()
    with caplog.at_level(logging.INFO, logger="cachelayer"):
        for i in range(3):
            cache.get_or_load(f"k{i}", loader)
        assert cache.stats()["circuit_open"] is True
        errors = cache.stats()["backend_errors"]
        for i in range(50):  # open: Redis is not even tried
            _, took = timed(lambda i=i: cache.get_or_load(f"open{i}", loader))
            assert took < 0.05
        assert cache.stats()["backend_errors"] == errors
        own_redis.start()
        clock.advance(10)  # cool-down over: the next call probes, succeeds, closes it
        cache.get_or_load("probe", loader)
        assert cache.stats()["circuit_open"] is False
        cache.set("after", 1)
        other = Cache(own_redis.url, clock=clock)
        assert other.get("after") == 1
        other.close()
    assert "circuit open" in caplog.text
    assert "circuit closed" in caplog.text
    cache.close()


def test_a_failed_probe_keeps_the_circuit_open(own_redis: RedisServer) -> None:
    from cachelayer.testing import FakeClock

    clock = FakeClock()
    cache = Cache(own_redis.url, clock=clock, breaker_cooldown=10, redis_timeout=TIMEOUT)
    own_redis.stop()
    for i in range(3):
        cache.get_or_load(f"k{i}", Counter())
    clock.advance(10)
    cache.get_or_load("probe", Counter())  # fails
    assert cache.stats()["circuit_open"] is True
    errors = cache.stats()["backend_errors"]
    cache.get_or_load("skipped", Counter())
    assert cache.stats()["backend_errors"] == errors
    cache.close()


@pytest.mark.slow
def test_chaos_no_caller_error_bounded_latency_one_load_per_key(own_redis: RedisServer) -> None:
    """Threads read 20 keys while the proxy cycles through delay, drop, blackhole and pass."""
    with Proxy(own_redis.port) as proxy:
        cache = Cache(proxy.url, redis_timeout=TIMEOUT, jitter=0, ttl=600, breaker_cooldown=0.3)
        loads: dict[str, int] = {}
        running: dict[str, int] = {}
        overlap: list[str] = []
        lock = threading.Lock()
        errors: list[BaseException] = []
        worst = 0.0
        stop = threading.Event()

        def loader_for(key: str) -> Any:
            def load() -> str:
                with lock:
                    loads[key] = loads.get(key, 0) + 1
                    running[key] = running.get(key, 0) + 1
                    if running[key] > 1:
                        overlap.append(key)
                time.sleep(0.005)
                with lock:
                    running[key] -= 1
                return key

            return load

        def reader(seed: int) -> None:
            nonlocal worst
            i = seed
            while not stop.is_set():
                key = f"k{i % 20}"
                i += 7
                try:
                    value, took = timed(lambda k=key: cache.get_or_load(k, loader_for(k)))
                    assert value == key
                except BaseException as exc:  # the invariant is: none at all
                    errors.append(exc)
                    return
                with lock:
                    worst = max(worst, took)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for mode in ["delay", "drop", "pass", "blackhole", "pass", "drop", "blackhole", "pass"]:
            proxy.set_mode(mode, 0.05)
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(5)
        cache.close()
    assert errors == []
    assert worst < BOUND
    assert sorted(loads) == sorted(f"k{i}" for i in range(20))
    assert overlap == []  # never two loads of one key at once in this process
    # Deaf spells clear L1 and keep entries about a second, so a key reloads about once a
    # second at most: not once per request.
    assert max(loads.values()) <= 6, loads


@pytest.mark.parametrize("api", ["sync", "async"], indirect=True)
def test_queued_invalidations_drain_and_reads_reach_redis_after_the_cooldown(
    own_redis: RedisServer, make_cache: Any, api: Any
) -> None:
    """The circuit opens while the subscription survives (a silent Redis: the listener's
    connection just hears nothing), so nothing but the listener's once-a-second flush of
    queued invalidations and the callers' own reads can close it. Once Redis answers and the
    cool-down is over, the flush must not take the half-open probe and then be refused it,
    which left the circuit open for good."""
    from cachelayer.testing import FakeClock

    clock = FakeClock()
    with Proxy(own_redis.port) as proxy:
        cache = make_cache(
            proxy.url, clock=clock, l1_maxsize=0, breaker_cooldown=10, redis_timeout=TIMEOUT
        )
        other = Cache(own_redis.url, clock=clock)
        try:
            api.set(cache, "gone", "old")
            api.set(cache, "kept", "v")
            proxy.set_mode("blackhole")
            api.delete(cache, "gone")  # times out: queued
            while not cache.stats()["circuit_open"]:
                assert api.get(cache, "kept") is None  # each read times out: fail open
            assert cache.stats()["subscribed"] is True  # the listener heard nothing amiss
            assert other.get("gone") == "old"  # the delete never reached Redis
            proxy.set_mode("pass")
            clock.advance(10)  # the cool-down is over: the next Redis call probes
            # The listener's next tick sends the queue, and its success closes the circuit.
            wait_for(lambda: other.get("gone") is None)
            assert cache.stats()["circuit_open"] is False
            hits, errors = cache.stats()["l2_hits"], cache.stats()["backend_errors"]
            assert api.get(cache, "kept") == "v"  # from Redis: L1 is off
            assert cache.stats()["l2_hits"] == hits + 1
            assert cache.stats()["backend_errors"] == errors
        finally:
            other.close()


def fence_moved(url: str, key: str, namespace: str = "cachelayer") -> bool:
    """Has Redis taken an invalidation of ``key`` (a delete moves the key's fence)?"""
    client = redis.Redis.from_url(url)
    try:
        return client.get(f"{namespace}:v1:fence:{{{key}}}") is not None
    finally:
        client.close()


@pytest.mark.parametrize("api", ["sync", "async"], indirect=True)
def test_a_strict_cache_raises_and_keeps_the_invalidations_queued(
    own_redis: RedisServer, make_cache: Any, api: Any
) -> None:
    cache = make_cache(own_redis.url, strict=True, redis_timeout=TIMEOUT)
    own_redis.stop()
    with pytest.raises(BackendError):
        api.delete(cache, "a")
    with pytest.raises(BackendError):  # sent with "a", which was queued: both fail again
        api.delete(cache, "b")
    own_redis.start()  # empty: no fence exists until an invalidation moves it
    sent = cache.stats()["invalidations_sent"]
    # Resubscribed, the listener sends the queue: neither delete was lost.
    wait_for(lambda: fence_moved(own_redis.url, "a") and fence_moved(own_redis.url, "b"))
    assert cache.stats()["invalidations_sent"] == sent + 1


def test_a_strict_cache_keeps_the_queue_when_the_listener_cannot_send_it(
    own_redis: RedisServer,
) -> None:
    """The listener re-sends the queue once a second; in strict mode a failed re-send raises
    on the listener thread, and the queue it had taken must go back, not vanish."""
    with Proxy(own_redis.port) as proxy:
        cache = Cache(proxy.url, strict=True, redis_timeout=TIMEOUT, breaker_threshold=100)
        try:
            subscribed(cache)
            proxy.set_mode("blackhole")  # silent: the subscription survives, calls time out
            with pytest.raises(BackendError):
                cache.delete("a")
            wait_for(lambda: cache.stats()["backend_errors"] >= 2)  # a re-send failed too
            assert cache.stats()["subscribed"] is True
            proxy.set_mode("pass")
            wait_for(lambda: fence_moved(own_redis.url, "a"))
        finally:
            cache.close()


class Interrupted(BaseException):
    """How a sync load ends when it is interrupted rather than failed (``KeyboardInterrupt``,
    ``SystemExit``, gevent's ``Timeout``): its flight is aborted, and the runner hands the
    lease on."""


def lease_held(url: str, key: str, namespace: str = "cachelayer") -> bool:
    client = redis.Redis.from_url(url)
    try:
        return bool(client.exists(f"{namespace}:v1:lease:{{{key}}}"))
    finally:
        client.close()


@pytest.mark.parametrize("strict", [False, True])
def test_an_interrupted_load_hands_its_lease_on_once_redis_is_back(
    own_redis: RedisServer, strict: bool
) -> None:
    with Proxy(own_redis.port) as proxy:
        cache = subscribed(Cache(proxy.url, redis_timeout=TIMEOUT, lease_ttl=60, strict=strict))

        def load() -> str:
            assert lease_held(own_redis.url, "k")
            proxy.set_mode("drop")  # Redis unreachable when the lease is handed on
            raise Interrupted

        try:
            with pytest.raises(Interrupted):  # the load's own ending, also in strict mode
                cache.get_or_load("k", load)
            assert lease_held(own_redis.url, "k")  # the release did not reach Redis
            proxy.set_mode("pass")
            # The listener releases it once Redis is back, not lease_ttl (60 s) later.
            wait_for(lambda: not lease_held(own_redis.url, "k"), timeout=10)
            assert cache.get_or_load("k", lambda: "v") == "v"
        finally:
            cache.close()


@pytest.mark.parametrize("strict", [False, True])
def test_a_cancelled_async_load_hands_its_lease_on_once_redis_is_back(
    own_redis: RedisServer, strict: bool
) -> None:
    with Proxy(own_redis.port) as proxy:
        cache = subscribed(Cache(proxy.url, redis_timeout=TIMEOUT, lease_ttl=60, strict=strict))

        async def main() -> None:
            loading = asyncio.Event()

            async def load() -> str:
                proxy.set_mode("drop")  # Redis unreachable when the lease is handed on
                loading.set()
                await asyncio.sleep(60)
                return "never"

            try:
                caller = asyncio.create_task(cache.aget_or_load("k", load))
                await loading.wait()
                caller.cancel()  # its only caller gone, the load is abandoned
                with pytest.raises(asyncio.CancelledError):
                    await caller
                # The abandoned flight tries to hand the lease on, then ends.
                await asyncio.to_thread(wait_for, lambda: not len(cache._flights))
                assert lease_held(own_redis.url, "k")  # the release did not reach Redis
                proxy.set_mode("pass")
                await asyncio.to_thread(wait_for, lambda: not lease_held(own_redis.url, "k"), 10)
            finally:
                await cache.aclose()

        asyncio.run(main())


def test_a_strict_cache_s_listener_retries_a_release_while_redis_is_silent(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    with Proxy(own_redis.port) as proxy:
        cache = subscribed(
            Cache(proxy.url, redis_timeout=TIMEOUT, lease_ttl=60, strict=True, breaker_threshold=9)
        )

        def load() -> str:
            proxy.set_mode("blackhole")  # silent: the listener stays subscribed and ticks
            raise Interrupted

        try:
            with caplog.at_level(logging.WARNING, logger="cachelayer"):
                with pytest.raises(Interrupted):
                    cache.get_or_load("k", load)
                wait_for(lambda: cache.stats()["backend_errors"] >= 2)  # the listener's retry
                proxy.set_mode("pass")
                wait_for(lambda: not lease_held(own_redis.url, "k"), timeout=10)
            # A failed retry is a Redis failure like any other, not a crash of the listener.
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        finally:
            cache.close()


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("ending", ["raises", "returns"])
def test_a_finished_load_hands_its_lease_on_once_redis_is_back(
    own_redis: RedisServer, strict: bool, ending: str
) -> None:
    """The flow's own release (after a loader error) and its fill (after a value) go to a
    Redis that is gone; strict mode raises there, and the release must still be retried."""
    with Proxy(own_redis.port) as proxy:
        cache = subscribed(Cache(proxy.url, redis_timeout=TIMEOUT, lease_ttl=60, strict=strict))

        def load() -> str:
            proxy.set_mode("drop")
            if ending == "raises":
                raise RuntimeError("the database is down too")
            return "v"

        try:
            if strict:
                with pytest.raises(BackendError):
                    cache.get_or_load("k", load)
            elif ending == "raises":
                with pytest.raises(RuntimeError):
                    cache.get_or_load("k", load)
            else:
                assert cache.get_or_load("k", load) == "v"
            assert lease_held(own_redis.url, "k")
            proxy.set_mode("pass")
            wait_for(lambda: not lease_held(own_redis.url, "k"), timeout=10)
        finally:
            cache.close()


def test_an_open_circuit_alone_keeps_l1_as_usual(own_redis: RedisServer) -> None:
    """Only a lost subscription limits L1 to degraded_l1_ttl (docs/operations/runbooks.md):
    with the circuit open but invalidations still heard, L1 serves its entries as usual."""
    from cachelayer.testing import FakeClock

    clock = FakeClock()
    with Proxy(own_redis.port) as proxy:
        cache = subscribed(
            Cache(
                proxy.url,
                clock=clock,
                jitter=0,
                early_refresh_beta=0,
                degraded_l1_ttl=1,
                breaker_threshold=1,
                breaker_cooldown=3600,
                redis_timeout=TIMEOUT,
            )
        )
        loader = Counter()
        try:
            assert cache.get_or_load("k", loader, ttl=60) == "loaded-1"
            proxy.set_mode("blackhole")  # commands time out; the subscription stays up
            assert cache.get("absent") is None  # fails, and opens the circuit
            assert cache.stats()["circuit_open"] is True
            assert cache.stats()["subscribed"] is True
            clock.advance(30)  # far past degraded_l1_ttl, well within the entry's ttl
            assert cache.get_or_load("k", loader) == "loaded-1"
            assert loader.calls == 1
        finally:
            proxy.set_mode("pass")
            cache.close()


def test_a_resubscribed_listener_hands_on_the_leases_it_could_not_release(
    own_redis: RedisServer,
) -> None:
    """Other processes wait on a lease whose release Redis missed until this one hands it
    on: as soon as its listener is back (the moment Redis is), not at its next tick. In a
    Sentinel failover, waiting for the tick made the slowest caller wait 1.65 s."""
    cache = subscribed(Cache(own_redis.url, lease_ttl=60))
    try:
        token = "t-1"
        _, lease, _, _ = cache._rkeys.coordination("k")
        with redis.Redis.from_url(own_redis.url) as client:
            client.set(lease, token, px=60_000)  # taken by this process; its fill failed
        cache._release_later("k", token)
        cache._on_message("subscribed", "", None)  # what the listener emits once back
        assert not lease_held(own_redis.url, "k")
        assert not cache._unreleased
    finally:
        cache.close()


def test_a_call_that_waited_out_the_pool_is_not_tried_again(own_redis: RedisServer) -> None:
    """A connection error that came fast is retried once (a pooled connection to a server
    that restarted); one that took the timeout (no pooled connection free in a surge) is
    not, or every call would pay the timeout twice."""
    timeout = 0.5
    cache = Cache(own_redis.url, redis_timeout=timeout, redis_max_connections=1, jitter=0)
    pool = cache._clients.sync_client().connection_pool
    held = pool.get_connection()  # the only one: every call must wait for it
    try:
        began = time.monotonic()
        assert cache.get("k") is None  # failed open
        took = time.monotonic() - began
        assert cache.stats()["backend_errors"] == 1
        assert timeout <= took < 2 * timeout, took
    finally:
        pool.release(held)
        cache.close()


def test_an_async_call_that_waited_out_the_pool_is_not_tried_again(
    own_redis: RedisServer,
) -> None:
    timeout = 0.5

    async def main() -> tuple[Any, float]:
        cache = Cache(own_redis.url, redis_timeout=timeout, redis_max_connections=1, jitter=0)
        pool = cache._clients.async_client().connection_pool
        held = await pool.get_connection()
        try:
            began = time.monotonic()
            got = await cache.aget("k")
            return got, time.monotonic() - began
        finally:
            await pool.release(held)
            assert cache.stats()["backend_errors"] == 1
            await cache.aclose()

    got, took = asyncio.run(main())
    assert got is None
    assert timeout <= took < 2 * timeout, took
