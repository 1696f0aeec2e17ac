"""Invalidation: exact, fleet-wide, and easy to wire into write paths."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import SyncAPI, subscribed, wait_for
from proxy import Proxy

from cachelayer import BackendError, Cache
from cachelayer._invalidate import Invalidation
from cachelayer.testing import FakeClock, RedisServer, redis_client

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]

WORKER = str(Path(__file__).resolve().parent.parent / "benchmarks" / "coherence_worker.py")


class Versions:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return f"v{self.calls}"


@pytest.fixture
def pair(make_cache: Callable[..., Cache], redis_url: str) -> tuple[Cache, Cache]:
    """Two caches on one namespace, each with its own subscription: two processes' worth."""
    return make_cache(redis_url, namespace="pair"), make_cache(redis_url, namespace="pair")


def test_delete_reaches_the_l1_of_another_process(api: SyncAPI, pair: tuple[Cache, Cache]) -> None:
    a, b = pair
    api.set(a, "k", "old")
    assert api.get(b, "k") == "old"  # now in b's L1 too
    api.delete(a, "k")
    wait_for(lambda: "k" not in b._l1.data)
    assert api.get(b, "k") is None


def test_set_replaces_the_value_in_every_process(api: SyncAPI, pair: tuple[Cache, Cache]) -> None:
    a, b = pair
    api.set(a, "k", "old")
    assert api.get(b, "k") == "old"
    api.set(a, "k", "new")
    wait_for(lambda: "k" not in b._l1.data)
    assert api.get(b, "k") == "new"


def test_tag_invalidation_drops_every_entry_carrying_the_tag_everywhere(
    api: SyncAPI, pair: tuple[Cache, Cache]
) -> None:
    a, b = pair
    load = Versions()
    for key in ("p1", "p2"):
        api.get_or_load(a, key, load, tags=("catalog", key))
        api.get_or_load(b, key, load, tags=("catalog", key))  # from Redis, into b's L1
    api.get_or_load(a, "other", load, tags=("sessions",))
    assert load.calls == 3
    calls = load.calls
    a.invalidate_tags("catalog")
    wait_for(lambda: "p1" not in b._l1.data and "p2" not in b._l1.data)
    assert "other" in a._l1.data  # untouched: it does not carry the tag
    assert api.get(b, "p1") is None  # not from L1, and Redis's copy no longer stands
    assert api.get_or_load(b, "p1", load, tags=("catalog", "p1")) == f"v{calls + 1}"


def test_expire_keeps_entries_for_stale_serving_but_not_as_fresh(
    api: SyncAPI, make_cache: Callable[..., Cache], redis_url: str
) -> None:
    clock = FakeClock()
    a = make_cache(redis_url, namespace="exp", clock=clock, ttl=300, stale_ttl=60)
    b = make_cache(redis_url, namespace="exp", clock=clock, ttl=300, stale_ttl=60)
    load = Versions()
    assert api.get_or_load(a, "k", load) == "v1"
    a.expire("k")
    assert api.get(a, "k") is None  # not fresh any more...
    assert api.get_or_load(b, "k", load) == "v1"  # ...but served stale while it refreshes
    api.settle(b)
    # The refresh replaced it. (Polled: a refresh that hits a transient Redis error is simply
    # retried by the next stale read, which is the behaviour, not a failure.)
    wait_for(lambda: api.get_or_load(b, "k", load) == "v2")


def test_an_invalidated_tag_wins_over_a_load_that_was_running(redis_url: str) -> None:
    a = subscribed(Cache(redis_url, namespace="race", jitter=0))
    b = subscribed(Cache(redis_url, namespace="race", jitter=0))
    started = threading.Event()

    def slow() -> str:
        started.set()
        time.sleep(0.3)
        return "old catalog"

    t = threading.Thread(target=lambda: a.get_or_load("page", slow, tags=("catalog",)))
    t.start()
    started.wait(5)
    b.invalidate_tags("catalog")  # the catalog changed while the page was being built
    t.join(5)
    assert a.get("page") is None  # not in a's L1...
    assert b.get("page") is None  # ...and the Redis copy (if written) does not stand
    assert a.get_or_load("page", lambda: "new catalog", tags=("catalog",)) == "new catalog"
    a.close()
    b.close()


def test_invalidates_hook_fires_only_when_the_write_succeeds(
    api: SyncAPI, make_cache: Callable[..., Cache], redis_url: str
) -> None:
    cache = make_cache(redis_url, namespace="hook")

    @cache.invalidates(keys=("product:{product_id}",), tags=("catalog",))
    def update_price(product_id: int, price: int, fail: bool = False) -> int:
        if fail:
            raise RuntimeError("constraint violated")
        return price

    api.set(cache, "product:7", "old", tags=("catalog",))
    api.set(cache, "list", "old", tags=("catalog",))
    with pytest.raises(RuntimeError):
        update_price(7, 10, fail=True)
    assert api.get(cache, "product:7") == "old"
    assert api.get(cache, "list") == "old"
    assert update_price(product_id=7, price=10) == 10
    assert api.get(cache, "product:7") is None
    assert api.get(cache, "list") is None


def test_invalidates_hook_on_a_coroutine_function(
    make_cache: Callable[..., Cache], redis_url: str
) -> None:
    cache = make_cache(redis_url, namespace="ahook")
    seen: list[Invalidation] = []
    cache.on_invalidate(seen.append)

    @cache.invalidates(keys=("cart:{session}",))
    async def add_to_cart(session: str, item: str) -> str:
        await asyncio.sleep(0)
        return item

    async def main() -> None:
        await add_to_cart("s1", "lamp")
        await cache.aclose()

    asyncio.run(main())
    assert [e.keys for e in seen] == [("cart:s1",)]


def test_a_batch_sends_once_on_success_and_nothing_on_failure(
    make_cache: Callable[..., Cache], redis_url: str
) -> None:
    cache = make_cache(redis_url, namespace="batch")
    for i in range(5):
        cache.set(f"k{i}", i)
    sent = cache.stats()["invalidations_sent"]

    def rolled_back() -> None:
        with cache.invalidation_batch():
            cache.delete("k0")
            cache.invalidate_tags("anything")
            raise ValueError("rollback")

    with pytest.raises(ValueError, match="rollback"):
        rolled_back()
    assert cache.get("k0") == 0  # nothing happened, not even locally
    assert cache.stats()["invalidations_sent"] == sent
    with cache.invalidation_batch():
        for i in range(5):
            cache.delete(f"k{i}")
        cache.invalidate_tags("catalog", "search")
        assert cache.get("k1") == 1  # still there until the block commits
    assert cache.stats()["invalidations_sent"] == sent + 1  # one round trip for all of it
    assert all(cache.get(f"k{i}") is None for i in range(5))


def test_async_batches_work_the_same(make_cache: Callable[..., Cache], redis_url: str) -> None:
    cache = make_cache(redis_url, namespace="abatch")
    cache.set("a", 1)
    cache.set("b", 2)

    async def main() -> None:
        async with cache.invalidation_batch():
            await cache.adelete("a")
            await cache.adelete("b")
        await cache.aclose()

    sent = cache.stats()["invalidations_sent"]
    asyncio.run(main())
    assert cache.stats()["invalidations_sent"] == sent + 1
    assert cache.get("a") is None


def test_callbacks_see_local_and_remote_invalidations(pair: tuple[Cache, Cache]) -> None:
    a, b = pair
    seen_a: list[Invalidation] = []
    seen_b: list[Invalidation] = []
    a.on_invalidate(seen_a.append)
    b.on_invalidate(seen_b.append)
    a.invalidate(keys=["k"], tags=["t"], expire=["e"])
    wait_for(lambda: seen_b)
    assert seen_a == [Invalidation(("k",), ("e",), ("t",), True, a._bus.sender)]
    assert seen_b == [Invalidation(("k",), ("e",), ("t",), False, a._bus.sender)]


def test_templated_tags_on_cached_functions(api: SyncAPI, make_cache: Callable[..., Cache]) -> None:
    cache = make_cache()
    calls: list[int] = []

    def get_product(product_id: int) -> int:
        calls.append(product_id)
        return product_id

    cached = api.decorate(cache, get_product, tags=("catalog", "product:{product_id}"))
    cached(1)
    cached(2)
    cache.invalidate_tags("product:1")
    cached(1)
    cached(2)
    assert calls == [1, 2, 1]


def test_l1_only_caches_invalidate_tags_locally(
    api: SyncAPI, make_cache: Callable[..., Cache]
) -> None:
    cache = make_cache()
    api.set(cache, "a", 1, tags=("t",))
    api.set(cache, "b", 2)
    cache.invalidate_tags("t")
    assert api.get(cache, "a") is None
    assert api.get(cache, "b") == 2


def test_while_redis_is_down_invalidations_apply_locally_and_are_retried(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a = subscribed(Cache(own_redis.url, namespace="down", jitter=0, breaker_cooldown=0.2))
    a.set("k", "old")
    own_redis.stop()
    with caplog.at_level(logging.WARNING, logger="cachelayer"):
        a.delete("k")  # Redis is gone: applied here at once, and queued
    assert a.get("k") is None
    assert "queued for retry" in caplog.text
    assert a._pending
    with a._pending_lock:  # a's listener may not send the queue before b has refilled
        own_redis.start()  # empty, as after a restart...
        client = redis.Redis.from_url(own_redis.url)
        b = subscribed(Cache(own_redis.url, namespace="down", jitter=0))
        b.set("k", "old")  # ...and refilled by someone with the old value
    wait_for(lambda: not a._pending, timeout=10)  # resubscribed: the queue went out
    assert client.get("down:v1:{k}") is None  # gone from Redis...
    wait_for(lambda: b.get("k") is None)  # ...and from the other process's L1
    client.close()
    a.close()
    b.close()


def test_strict_caches_raise_when_an_invalidation_cannot_be_sent(own_redis: RedisServer) -> None:
    cache = Cache(own_redis.url, strict=True)
    own_redis.stop()
    with pytest.raises(BackendError):
        cache.delete("k")
    cache.close()


def test_a_subscriber_that_lost_its_connection_does_not_serve_stale_l1(
    own_redis: RedisServer,
) -> None:
    with Proxy(own_redis.port) as proxy:
        deaf = subscribed(Cache(proxy.url, namespace="deaf", jitter=0, redis_timeout=0.2))
        writer = subscribed(Cache(own_redis.url, namespace="deaf", jitter=0))
        db = {"price": "old"}
        assert deaf.get_or_load("price", lambda: db["price"]) == "old"
        assert "price" in deaf._l1.data
        proxy.set_mode("drop")  # the deaf process's connections die, and cannot come back
        wait_for(lambda: deaf.stats()["subscribed"] is False)
        db["price"] = "new"
        writer.delete("price")  # the deaf process cannot hear this
        assert deaf.get_or_load("price", lambda: db["price"]) == "new"
        assert deaf.stats()["subscription_losses"] >= 1
        proxy.set_mode("pass")
        deaf.close()
        writer.close()


@pytest.mark.slow
def test_real_processes_never_serve_a_value_older_than_a_delivered_invalidation(
    redis_url: str,
) -> None:
    client = redis_client(redis_url)
    ns = f"coherence{time.monotonic_ns()}"
    client.set(f"{ns}:db", 0)
    readers = [
        subprocess.Popen(
            [sys.executable, WORKER, redis_url, ns, f"r{i}"], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    try:
        results, latencies = _drive_coherence(client, redis_url, ns, readers)
    finally:
        client.set(f"{ns}:stop", 1)
        for p in readers:
            if p.poll() is None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    assert all(r["violations"] == 0 for r in results), results
    assert all(r["reads"] > 40 for r in results)
    latencies.sort()
    p50, worst = latencies[len(latencies) // 2] * 1000, latencies[-1] * 1000
    print(f"delivery p50 {p50:.2f} ms, max {worst:.2f} ms")


def _drive_coherence(
    client: Any, url: str, ns: str, readers: list[subprocess.Popen[str]]
) -> tuple[list[dict[str, int]], list[float]]:
    wait_for(lambda: client.llen(f"{ns}:ready") == 2, timeout=20)
    writer = subscribed(Cache(url, namespace=ns, jitter=0))
    latencies = []
    for version in range(1, 41):
        client.set(f"{ns}:db", version)
        sent = time.time()
        if version % 2:
            writer.delete("price")
        else:
            writer.invalidate_tags("catalog")
        for name in ("r0", "r1"):
            _, raw = client.blpop([f"{ns}:ack:{name}"], timeout=5) or (None, None)
            assert raw is not None, "an invalidation was not delivered"
            acked, at = json.loads(raw)
            assert acked >= version
            latencies.append(at - sent)
    client.set(f"{ns}:stop", 1)
    results = [json.loads(p.communicate(timeout=20)[0]) for p in readers]
    writer.close()
    return results, latencies
