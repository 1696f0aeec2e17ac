"""Failure paths found in review: each test fails on the code before its fix."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio
from conftest import subscribed, wait_for
from proxy import Proxy

from cachelayer import Cache
from cachelayer._keys import storage_key
from cachelayer._tags import TagVersions
from cachelayer.testing import FakeClock, RedisServer

pytestmark = pytest.mark.redis


def test_a_cancelled_probe_does_not_leave_the_circuit_open_for_good(own_redis: RedisServer) -> None:
    clock = FakeClock()
    with Proxy(own_redis.port) as proxy:
        cache = Cache(
            proxy.url, clock=clock, breaker_threshold=1, breaker_cooldown=5, redis_timeout=2
        )
        own_redis.stop()
        cache.get("k")  # one failure opens the circuit
        assert cache.stats()["circuit_open"] is True
        own_redis.start()
        proxy.set_mode("delay", 0.5)  # the probe will be slow...
        clock.advance(5)

        async def probe_then_cancel() -> None:
            task = asyncio.create_task(cache.aget("k"))
            await asyncio.sleep(0.1)
            task.cancel()  # ...and its caller gives up (a client disconnect, a timeout)
            with pytest.raises(asyncio.CancelledError):
                await task
            await cache.aclose()

        asyncio.run(probe_then_cancel())
        assert cache._health.probing is False
        proxy.set_mode("pass")
        cache.get("k")  # the next call gets to probe, succeeds, closes the circuit
        assert cache.stats()["circuit_open"] is False
        cache.close()


def test_cancelling_a_load_while_it_fetches_tag_versions_returns_its_origin_slot(
    own_redis: RedisServer,
) -> None:
    with Proxy(own_redis.port) as proxy:
        cache = Cache(proxy.url, origin_limit=1, jitter=0, redis_timeout=2)

        async def main() -> None:
            await cache.aget("warm")  # connected
            proxy.set_mode("delay", 0.3)  # every Redis reply now takes 0.3 s

            async def load() -> str:
                return "v"

            task = asyncio.create_task(cache.aget_or_load("k", load, tags=("catalog",)))
            await asyncio.sleep(0.9)  # past GET and the lease, inside the tag-version fetch
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0.1)
            await cache.aclose()

        asyncio.run(main())
        assert cache.stats()["loads_in_flight"] == 0
        proxy.set_mode("pass")
        assert cache.get_or_load("other", lambda: "loaded") == "loaded"  # not shed
        cache.close()


def test_a_cache_given_an_asyncio_client_hears_invalidations(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    cache = subscribed(Cache(client, namespace="given"))
    assert cache.stats()["subscribed"] is True
    cache.close()


def test_a_deaf_process_does_not_remember_tag_versions() -> None:
    versions = TagVersions(authoritative=False)
    versions.clear(listening=True)
    assert versions.learn(("t",), [3], versions.generation)
    assert versions.known(("t",)) == (3,)
    versions.clear(listening=False)  # the subscription was lost
    assert not versions.learn(("t",), [3], versions.generation)
    assert versions.known(("t",)) is None  # so every check asks Redis


def test_a_set_redis_missed_is_retried_as_a_delete_when_it_is_back(own_redis: RedisServer) -> None:
    with Proxy(own_redis.port) as proxy:
        a = subscribed(Cache(proxy.url, namespace="lost", redis_timeout=0.2, breaker_cooldown=0.3))
        b = subscribed(Cache(own_redis.url, namespace="lost"))
        a.set("k", "old")
        wait_for(lambda: b.get("k") == "old")
        proxy.set_mode("blackhole")
        a.set("k", "new")  # Redis does not answer: applied here, queued
        assert a._pending
        proxy.set_mode("drop")
        time.sleep(0.1)
        proxy.set_mode("pass")
        wait_for(lambda: not a._pending, timeout=10)  # retried by the listener's tick
        wait_for(lambda: b.get("k") != "old")  # the other process no longer serves "old"
        a.close()
        b.close()


def test_a_plain_key_cannot_spell_another_keys_digest() -> None:
    long_key = "report:" + "x" * 300
    forged = storage_key(long_key)
    assert "#" in forged
    assert storage_key(forged) != forged


def test_a_strict_cache_raises_while_the_circuit_is_open(own_redis: RedisServer) -> None:
    from cachelayer import BackendError

    cache = Cache(own_redis.url, strict=True, breaker_threshold=1, redis_timeout=0.2)
    own_redis.stop()
    with pytest.raises(BackendError):
        cache.get("k")  # fails, and opens the circuit
    with pytest.raises(BackendError, match="circuit is open"):
        cache.set("k", 1)  # not attempted, but strict callers are still told
    cache.close()
