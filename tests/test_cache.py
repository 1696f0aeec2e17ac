"""Behaviour of Cache, run through the sync and the async API alike (the ``api`` fixture)."""

from __future__ import annotations

import gc
import inspect
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import redis
from conftest import SyncAPI

from cachelayer import Cache, ConfigurationError, InvalidKeyError, Loaded, SerializationError
from cachelayer.testing import FakeClock, redis_client

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]


@pytest.fixture(params=["l1", "l1+redis"])
def tiers(request: pytest.FixtureRequest, redis_url: str) -> str | None:
    return None if request.param == "l1" else redis_url


class Loader:
    """A loader that counts its calls and can be told to fail."""

    def __init__(self, value: Any = "loaded") -> None:
        self.value = value
        self.calls = 0
        self.error: BaseException | None = None

    def __call__(self) -> Any:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.value


def raw(url: str) -> Any:
    return redis_client(url)


def test_set_then_get_round_trips(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    cache = make_cache(tiers)
    api.set(cache, "k", {"id": 1, "tags": ("a", "b")})
    assert api.get(cache, "k") == {"id": 1, "tags": ("a", "b")}


def test_get_of_a_missing_key_returns_the_default(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    cache = make_cache(tiers)
    marker = object()
    assert api.get(cache, "absent") is None
    assert api.get(cache, "absent", marker) is marker


def test_none_is_a_value_distinct_from_a_miss(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    cache = make_cache(tiers)
    loader = Loader(None)
    assert api.get_or_load(cache, "none", loader) is None
    assert api.get_or_load(cache, "none", loader) is None
    assert loader.calls == 1
    assert api.get(cache, "none", "MISS") is None


def test_cache_none_false_does_not_store_none(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    cache = make_cache(tiers, cache_none=False)
    loader = Loader(None)
    api.get_or_load(cache, "none", loader)
    api.get_or_load(cache, "none", loader)
    assert loader.calls == 2
    assert api.get(cache, "none", "MISS") == "MISS"


def test_read_through_loads_once_then_serves_from_cache(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    cache = make_cache(tiers)
    loader = Loader({"name": "lamp"})
    for _ in range(5):
        assert api.get_or_load(cache, "product:1", loader) == {"name": "lamp"}
    assert loader.calls == 1
    assert cache.stats()["l1_hits"] == 4


def test_loader_exceptions_pass_through_unchanged_and_are_not_cached(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    cache = make_cache(tiers)
    loader = Loader()
    boom = LookupError("db says no")
    loader.error = boom
    with pytest.raises(LookupError) as info:
        api.get_or_load(cache, "k", loader)
    assert info.value is boom
    loader.error = None
    assert api.get_or_load(cache, "k", loader) == "loaded"
    assert loader.calls == 2
    assert cache.stats()["load_errors"] == 1


class Abort(BaseException):
    """A loader's own ending that is not an ``Exception`` (nor the caller's interruption)."""


@pytest.mark.parametrize("hard_timeout", [None, 5.0])
def test_a_loader_s_base_exception_passes_through_once_and_is_not_cached(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any, hard_timeout: float | None
) -> None:
    cache = make_cache(tiers)
    loader = Loader()
    abort = loader.error = Abort()
    with pytest.raises(Abort) as info:
        api.get_or_load(cache, "k", loader, hard_timeout=hard_timeout)
    assert info.value is abort
    assert loader.calls == 1
    loader.error = None
    assert api.get_or_load(cache, "k", loader, hard_timeout=hard_timeout) == "loaded"
    assert loader.calls == 2


def test_a_background_refresh_ended_by_a_base_exception_is_logged_and_stale_is_served(
    api: SyncAPI,
    make_cache: Callable[..., Cache],
    tiers: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    cache = make_cache(tiers, clock=clock, ttl=10, stale_ttl=60)
    loader = Loader("v1")
    assert api.get_or_load(cache, "k", loader) == "v1"
    clock.advance(15)
    loader.error = Abort()
    with caplog.at_level(logging.WARNING):
        assert api.get_or_load(cache, "k", loader) == "v1"  # stale; refreshed in background
        api.settle(cache)
        gc.collect()  # asyncio logs a task's unretrieved exception when it is collected
    assert loader.calls == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("background refresh failed" in m and "Abort" in m for m in messages)
    assert not [m for m in messages if "never retrieved" in m]
    loader.error = None
    assert api.get_or_load(cache, "k", loader) == "v1"  # still stale: serves, refreshes
    api.settle(cache)
    assert api.get_or_load(cache, "k", loader) == "v1"
    assert loader.calls == 3


def test_entries_expire_after_their_ttl(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    clock = FakeClock()
    cache = make_cache(tiers, clock=clock, ttl=30)
    loader = Loader()
    api.get_or_load(cache, "k", loader)
    clock.advance(29.9)
    api.get_or_load(cache, "k", loader)
    assert loader.calls == 1
    clock.advance(0.2)
    api.get_or_load(cache, "k", loader)
    assert loader.calls == 2


def test_per_call_ttl_overrides_the_default(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    clock = FakeClock()
    cache = make_cache(tiers, clock=clock, ttl=300)
    api.set(cache, "short", 1, ttl=5)
    clock.advance(6)
    assert api.get(cache, "short") is None


def test_a_loader_can_choose_its_own_ttl_or_not_to_be_stored(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    clock = FakeClock()
    cache = make_cache(tiers, clock=clock, ttl=300)
    assert api.get_or_load(cache, "a", lambda: Loaded("page", ttl=5)) == "page"
    assert api.get(cache, "a") == "page"
    clock.advance(6)
    assert api.get(cache, "a") is None
    assert api.get_or_load(cache, "b", lambda: Loaded("once", store=False)) == "once"
    assert api.get(cache, "b") is None


def test_delete_removes_from_both_tiers(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    cache = make_cache(tiers)
    api.set(cache, "a", 1)
    api.set(cache, "b", 2)
    api.delete(cache, "a", "b")
    assert api.get(cache, "a") is None
    assert api.get(cache, "b") is None


def test_decorated_functions_keep_their_name_and_signature(
    api: SyncAPI, make_cache: Callable[..., Cache]
) -> None:
    def get_product(product_id: int, currency: str = "EUR") -> dict[str, Any]:
        """Docstring."""
        return {"id": product_id}

    wrapped = api.decorate(make_cache(), get_product)
    assert wrapped.__name__ == "get_product"
    assert wrapped.__doc__ == "Docstring."
    assert inspect.signature(wrapped) == inspect.signature(get_product)


def test_decorated_function_caches_per_argument_and_invalidates(
    api: SyncAPI, make_cache: Callable[..., Cache], tiers: Any
) -> None:
    calls: list[int] = []

    def get_product(product_id: int) -> dict[str, int]:
        calls.append(product_id)
        return {"id": product_id}

    cached = api.decorate(make_cache(tiers), get_product, key="product:{product_id}")
    assert cached(1) == {"id": 1}
    assert cached(product_id=1) == {"id": 1}
    assert cached(2) == {"id": 2}
    assert calls == [1, 2]
    assert cached.key(1) == "product:1"
    cached.invalidate(1)
    cached(1)
    assert calls == [1, 2, 1]


def test_async_decorator_caches_coroutine_functions(make_cache: Callable[..., Cache]) -> None:
    import asyncio

    cache = make_cache()
    calls = 0

    @cache.cached()
    async def fetch(x: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        return x * 2

    assert inspect.iscoroutinefunction(fetch)

    async def main() -> list[int]:
        return [await fetch(3), await fetch(3), await fetch(x=3)]

    assert asyncio.run(main()) == [6, 6, 6]
    assert calls == 1


def test_another_process_reads_what_one_wrote_through_redis(
    api: SyncAPI, make_cache: Callable[..., Cache], redis_url: str
) -> None:
    writer = make_cache(redis_url, namespace="shop")
    reader = make_cache(redis_url, namespace="shop")
    api.set(writer, "k", [1, 2])
    # The write's own invalidation message reaches the reader too; let it land first, so it
    # does not evict what the reader is about to cache.
    deadline = time.monotonic() + 5
    while reader.stats()["invalidations_received"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    loader = Loader()
    assert api.get_or_load(reader, "k", loader) == [1, 2]
    assert loader.calls == 0
    assert reader.stats()["l2_hits"] == 1
    # ... and keeps it in its own L1 from then on.
    api.get(reader, "k")
    assert reader.stats()["l1_hits"] == 1


def test_namespaces_do_not_share_entries(
    api: SyncAPI, make_cache: Callable[..., Cache], redis_url: str
) -> None:
    api.set(make_cache(redis_url, namespace="a"), "k", 1)
    assert api.get(make_cache(redis_url, namespace="b"), "k") is None


def test_redis_never_keeps_an_entry_past_its_grace(
    api: SyncAPI, make_cache: Callable[..., Cache], redis_url: str
) -> None:
    cache = make_cache(redis_url, namespace="ttl", ttl=30, stale_ttl=20)
    api.set(cache, "k", 1)
    pttl = raw(redis_url).pttl("ttl:v1:{k}")
    assert 49_000 < pttl <= 50_000


def test_l1_keeps_an_entry_no_longer_than_its_freshness_plus_grace(
    api: SyncAPI, make_cache: Callable[..., Cache]
) -> None:
    clock = FakeClock()
    cache = make_cache(clock=clock, ttl=30, stale_ttl=20)
    api.set(cache, "k", 1)
    entry = cache._l1.data["k"]
    assert entry.l1_fresh == clock() + 30
    assert entry.l1_expires == clock() + 50


def test_l1_ttl_caps_how_long_a_process_trusts_its_own_copy(
    api: SyncAPI, make_cache: Callable[..., Cache], redis_url: str
) -> None:
    from cachelayer._codec import Entry, encode_value, pack_entry

    clock = FakeClock()
    cache = make_cache(redis_url, clock=clock, ttl=60, l1_ttl=5)
    api.set(cache, "price", 10)
    # Something changed the value in Redis without telling anyone (no invalidation message:
    # an old deploy, a hand edit).
    now = clock()
    raw(redis_url).set(
        "cachelayer:v1:{price}",
        pack_entry(Entry(12, encode_value(12), now, now + 60, now + 60, 0.0, ())),
    )
    assert api.get(cache, "price") == 10  # this process still trusts its copy...
    clock.advance(5)
    assert api.get(cache, "price") == 12  # ...only for l1_ttl seconds


def test_jitter_spreads_expiry_within_its_bounds(
    api: SyncAPI, make_cache: Callable[..., Cache]
) -> None:
    clock = FakeClock()
    cache = make_cache(clock=clock, ttl=100, jitter=0.1, rng=random.Random(7))
    for i in range(200):
        api.set(cache, f"k{i}", i)
    ttls = [cache._l1.data[f"k{i}"].fresh_until - clock() for i in range(200)]
    assert all(90 <= t <= 110 for t in ttls)
    assert max(ttls) - min(ttls) > 15  # spread, not one cliff


def test_values_are_shared_in_l1_by_default_and_isolated_with_l1_copy(
    api: SyncAPI, make_cache: Callable[..., Cache]
) -> None:
    shared = make_cache()
    api.get_or_load(shared, "k", lambda: {"stock": 5})
    api.get(shared, "k")["stock"] = 0
    assert api.get(shared, "k") == {"stock": 0}  # the documented trade-off

    isolated = make_cache(l1_copy=True)
    first = api.get_or_load(isolated, "k", lambda: {"stock": 5})
    first["stock"] = 0
    api.get(isolated, "k")["stock"] = -1
    assert api.get(isolated, "k") == {"stock": 5}


def test_unencodable_loaded_values_are_returned_logged_counted_and_not_stored(
    api: SyncAPI,
    make_cache: Callable[..., Cache],
    tiers: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = make_cache(tiers)

    class Row:
        pass

    row = Row()
    loader = Loader(row)
    with caplog.at_level(logging.WARNING, logger="cachelayer"):
        assert api.get_or_load(cache, "row", loader) is row
    assert "Row" in caplog.text and "row" in caplog.text
    assert cache.stats()["serialization_errors"] == 1
    api.get_or_load(cache, "row", loader)
    assert loader.calls == 2


def test_explicit_set_of_an_unencodable_value_raises(
    api: SyncAPI, make_cache: Callable[..., Cache]
) -> None:
    with pytest.raises(SerializationError, match="object"):
        api.set(make_cache(), "k", object())


def test_garbage_bytes_in_redis_are_a_logged_miss_then_overwritten(
    api: SyncAPI,
    make_cache: Callable[..., Cache],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = make_cache(redis_url, namespace="g")
    client = raw(redis_url)
    client.set("g:v1:{k}", b"\x93not msgpack at all")
    client.set("g:v1:{j}", msgpack.packb({"someone": "else's format"}))
    loader = Loader("fresh")
    with caplog.at_level(logging.WARNING, logger="cachelayer"):
        assert api.get_or_load(cache, "k", loader) == "fresh"
        assert api.get(cache, "j") is None
    assert "undecodable" in caplog.text
    assert cache.stats()["corrupt_entries"] == 2
    assert api.get(make_cache(redis_url, namespace="g"), "k") == "fresh"


def test_strict_caches_raise_on_garbage(
    api: SyncAPI, make_cache: Callable[..., Cache], redis_url: str
) -> None:
    cache = make_cache(redis_url, namespace="g", strict=True)
    raw(redis_url).set("g:v1:{k}", b"garbage")
    with pytest.raises(SerializationError, match="corrupt"):
        api.get(cache, "k")


def test_keys_must_be_strings(api: SyncAPI, make_cache: Callable[..., Cache]) -> None:
    with pytest.raises(InvalidKeyError):
        api.get(make_cache(), 42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"ttl": "60"}, "ttl"),
        ({"stale_ttl": -1}, "stale_ttl"),
        ({"jitter": 1.0}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"l1_maxsize": -1}, "l1_maxsize"),
        ({"l1_ttl": 0}, "l1_ttl"),
        ({"redis_timeout": 0}, "redis_timeout"),
        ({"clock": 5}, "clock"),
        ({"redis": 6379}, "redis must be"),
        ({"redis": "http://[::1"}, "malformed redis URL"),
        ({"redis": "ftp://localhost"}, "malformed redis URL"),
    ],
)
def test_malformed_configuration_is_refused_clearly(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        Cache(**kwargs)
    assert isinstance(info.value, ValueError)


def test_per_call_options_are_validated(make_cache: Callable[..., Cache]) -> None:
    cache = make_cache()
    with pytest.raises(ConfigurationError, match="tags"):
        cache.set("k", 1, tags="catalog")
    with pytest.raises(ConfigurationError, match="ttl"):
        cache.cached(ttl=-5)


def test_clients_that_decode_responses_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="decode_responses"):
        Cache(redis.Redis(decode_responses=True))


def test_a_sync_function_cannot_use_an_async_only_client() -> None:
    import redis.asyncio

    cache = Cache(redis.asyncio.Redis())
    with pytest.raises(ConfigurationError, match="sync"):
        cache.cached()(lambda: 1)
