"""Prometheus metrics: names, labels, sharing a registry, histograms off the hit path, and the
``cachelayer`` logger's one line per state change."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import subscribed
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cachelayer import Cache, ConfigurationError, OriginOverloadedError
from cachelayer.metrics import PrometheusMetrics, loads_saved, metrics_app
from cachelayer.testing import FakeClock, RedisServer

# Every name the library exports (histograms by their base name); tests/test_docs.py checks
# the alert rules and the dashboard against this list.
EXPORTED = {
    "cachelayer_requests_total",
    "cachelayer_loads_total",
    "cachelayer_load_duration_seconds",
    "cachelayer_loads_in_flight",
    "cachelayer_origin_limit",
    "cachelayer_origin_waiting",
    "cachelayer_origin_wait_seconds",
    "cachelayer_coalesced_total",
    "cachelayer_stale_served_total",
    "cachelayer_loads_saved_total",
    "cachelayer_backend_errors_total",
    "cachelayer_backend_skipped_total",
    "cachelayer_circuit_open",
    "cachelayer_circuit_opened_total",
    "cachelayer_redis_healthy",
    "cachelayer_subscribed",
    "cachelayer_subscription_losses_total",
    "cachelayer_invalidations_total",
    "cachelayer_invalidations_unconfirmed_total",
    "cachelayer_l1_entries",
    "cachelayer_l1_evictions_total",
    "cachelayer_refreshes_total",
    "cachelayer_fenced_writes_total",
    "cachelayer_serialization_errors_total",
    "cachelayer_corrupt_entries_total",
}


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, parsed back from the text format Prometheus reads."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return samples(registry).get((name, frozenset(labels.items())))


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def test_counts_of_hits_misses_and_loads_are_exported_per_tier_and_outcome() -> None:
    registry = CollectorRegistry()
    cache = Cache(None, namespace="shop", metrics=PrometheusMetrics(registry))
    for _ in range(3):
        cache.get_or_load("a", lambda: 1)
    with pytest.raises(ZeroDivisionError):
        cache.get_or_load("b", lambda: 1 // 0)
    assert value(registry, "cachelayer_requests_total", cache="shop", tier="l1", result="hit") == 2
    assert value(registry, "cachelayer_requests_total", cache="shop", tier="l1", result="miss") == 2
    assert value(registry, "cachelayer_loads_total", cache="shop", outcome="success") == 1
    assert value(registry, "cachelayer_loads_total", cache="shop", outcome="error") == 1
    assert value(registry, "cachelayer_load_duration_seconds_count", cache="shop") == 2
    assert value(registry, "cachelayer_l1_entries", cache="shop") == 1
    assert value(registry, "cachelayer_loads_saved_total", cache="shop") == 2


def test_every_exported_name_is_documented_and_labels_never_carry_keys() -> None:
    registry = CollectorRegistry()
    cache = Cache(None, namespace="shop", origin_limit=4, metrics=PrometheusMetrics(registry))
    for i in range(50):
        cache.get_or_load(f"product:{i}", lambda: 1)
    text = generate_latest(registry).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    # The parser reports counters without _total, histograms by their base name.
    exported = {n.removesuffix("_total") for n in EXPORTED}
    assert names - {n + "_created" for n in exported} == exported
    assert "product:" not in text
    allowed = {"cache", "tier", "result", "outcome", "reason", "scope", "source", "le"}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert set(s.labels) <= allowed, s


def test_origin_guard_use_and_waits_are_visible_while_a_load_holds_the_only_slot() -> None:
    registry = CollectorRegistry()
    cache = Cache(
        None, namespace="db", origin_limit=1, origin_wait=30, metrics=PrometheusMetrics(registry)
    )
    release = threading.Event()
    slow = threading.Thread(target=cache.get_or_load, args=("a", lambda: release.wait(30)))
    slow.start()
    wait_for(lambda: cache.stats()["loads_in_flight"] == 1, "the first load started")
    queued = threading.Thread(target=cache.get_or_load, args=("b", lambda: 2))
    queued.start()
    wait_for(lambda: cache.stats()["origin_waiting"] == 1, "the second load queued")
    assert value(registry, "cachelayer_loads_in_flight", cache="db") == 1
    assert value(registry, "cachelayer_origin_limit", cache="db") == 1
    assert value(registry, "cachelayer_origin_waiting", cache="db") == 1
    release.set()
    slow.join(10)
    queued.join(10)
    assert value(registry, "cachelayer_loads_in_flight", cache="db") == 0
    assert value(registry, "cachelayer_origin_wait_seconds_count", cache="db") == 1
    assert value(registry, "cachelayer_loads_total", cache="db", outcome="success") == 2


def test_a_shed_load_is_counted_as_shed() -> None:
    registry = CollectorRegistry()
    cache = Cache(
        None, namespace="db", origin_limit=1, origin_wait=0, metrics=PrometheusMetrics(registry)
    )
    release = threading.Event()
    slow = threading.Thread(target=cache.get_or_load, args=("a", lambda: release.wait(30)))
    slow.start()
    wait_for(lambda: cache.stats()["loads_in_flight"] == 1, "the first load started")
    with pytest.raises(OriginOverloadedError):
        cache.get_or_load("b", lambda: 2)
    release.set()
    slow.join(10)
    assert value(registry, "cachelayer_loads_total", cache="db", outcome="shed") == 1


def test_stale_served_is_counted_per_reason_and_in_loads_saved() -> None:
    registry = CollectorRegistry()
    clock = FakeClock()
    cache = Cache(
        None,
        namespace="s",
        ttl=10,
        stale_ttl=60,
        jitter=0,
        clock=clock,
        early_refresh_beta=0,
        metrics=PrometheusMetrics(registry),
    )
    cache.get_or_load("a", lambda: 1)
    clock.advance(11)
    cache.get_or_load("a", lambda: 2)  # stale served while one refresh runs
    wait_for(lambda: not len(cache._flights), "the refresh finished")
    assert value(registry, "cachelayer_stale_served_total", cache="s", reason="swr") == 1
    assert value(registry, "cachelayer_requests_total", cache="s", tier="any", result="stale") == 1
    for reason in ("fail_safe", "soft_timeout", "overload", "lease_timeout"):
        assert value(registry, "cachelayer_stale_served_total", cache="s", reason=reason) == 0
    assert value(registry, "cachelayer_loads_saved_total", cache="s") == 1


def test_loads_saved_is_hits_plus_coalesced_plus_stale() -> None:
    stats = dict.fromkeys(
        ["l1_hits", "l2_hits", "coalesced", "fleet_coalesced"]
        + [f"stale_{r}" for r in ("swr", "fail_safe", "soft_timeout", "overload", "lease_timeout")],
        0,
    )
    stats.update(l1_hits=100, l2_hits=10, coalesced=5, fleet_coalesced=3, stale_swr=2)
    assert loads_saved(stats) == 117  # fleet_coalesced callers are l2 hits already


def test_two_caches_share_a_registry_told_apart_by_the_cache_label() -> None:
    registry = CollectorRegistry()
    a = Cache(None, namespace="catalog", metrics=PrometheusMetrics(registry))
    b = Cache(None, namespace="sessions", metrics=PrometheusMetrics(registry))
    a.get_or_load("k", lambda: 1)
    a.get_or_load("k", lambda: 1)
    b.get_or_load("k", lambda: 1)
    hits = "cachelayer_requests_total"
    assert value(registry, hits, cache="catalog", tier="l1", result="hit") == 1
    assert value(registry, hits, cache="sessions", tier="l1", result="hit") == 0
    # A second scrape is the same: no duplicated time series, nothing registered twice.
    assert samples(registry) == samples(registry)


def test_one_namespace_twice_in_a_registry_needs_a_cache_label() -> None:
    registry = CollectorRegistry()
    kept = Cache(None, namespace="shop", metrics=PrometheusMetrics(registry))
    with pytest.raises(ConfigurationError, match="cache_label"):
        Cache(None, namespace="shop", metrics=PrometheusMetrics(registry))
    other = Cache(
        None, namespace="shop", metrics=PrometheusMetrics(registry, cache_label="shop-eu")
    )
    assert value(registry, "cachelayer_l1_entries", cache="shop-eu") == 0
    assert kept is not other


def test_separate_registries_each_get_their_own_series() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    a = Cache(None, namespace="shop", metrics=PrometheusMetrics(one))
    b = Cache(None, namespace="shop", metrics=PrometheusMetrics(two))
    a.get_or_load("k", lambda: 1)
    assert value(one, "cachelayer_loads_total", cache="shop", outcome="success") == 1
    assert value(two, "cachelayer_loads_total", cache="shop", outcome="success") == 0
    assert b is not a


def test_a_collected_cache_leaves_the_registry_and_frees_its_label() -> None:
    registry = CollectorRegistry()
    cache = Cache(None, namespace="tmp", metrics=PrometheusMetrics(registry))
    cache.get_or_load("k", lambda: 1)
    del cache
    gc.collect()
    assert not [key for key in samples(registry) if ("cache", "tmp") in key[1]]
    Cache(None, namespace="tmp", metrics=PrometheusMetrics(registry))  # the label is free


def test_one_observer_cannot_watch_two_caches() -> None:
    metrics = PrometheusMetrics(CollectorRegistry())
    Cache(None, namespace="a", metrics=metrics)
    with pytest.raises(ConfigurationError, match="one per cache"):
        Cache(None, namespace="b", metrics=metrics)


def test_a_hit_never_calls_the_observer() -> None:
    calls: list[str] = []

    class Spy(PrometheusMetrics):
        def load_finished(self, seconds: float, outcome: str) -> None:
            calls.append(outcome)
            super().load_finished(seconds, outcome)

        def origin_waited(self, seconds: float) -> None:
            calls.append("wait")

    cache = Cache(None, namespace="spy", metrics=Spy(CollectorRegistry()))
    fn = cache.cached()(lambda x: x)
    fn(1)
    calls.clear()
    for _ in range(1000):
        fn(1)
        cache.get_or_load(fn.key(1), lambda: 0)
    assert calls == []


def test_importing_the_module_registers_nothing_and_imports_no_prometheus_client() -> None:
    code = (
        "import sys, cachelayer, cachelayer.metrics\n"
        "assert 'prometheus_client' not in sys.modules, 'imported eagerly'\n"
        "from prometheus_client import REGISTRY, generate_latest\n"
        "assert b'cachelayer_' not in generate_latest(REGISTRY)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_prometheus_client_the_error_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from cachelayer.metrics import PrometheusMetrics\n"
        "try:\n    PrometheusMetrics()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'cachelayer[prometheus]'" in out.stdout


def test_the_default_registry_is_used_when_none_is_given() -> None:
    from prometheus_client import REGISTRY

    cache = Cache(None, namespace="default-registry-test", metrics=PrometheusMetrics())
    cache.get_or_load("k", lambda: 1)
    assert (
        REGISTRY.get_sample_value(
            "cachelayer_loads_total", {"cache": "default-registry-test", "outcome": "success"}
        )
        == 1
    )


@pytest.mark.asyncio
async def test_the_asgi_endpoint_serves_the_registry() -> None:
    registry = CollectorRegistry()
    cache = Cache(None, namespace="web", metrics=PrometheusMetrics(registry))
    cache.get_or_load("k", lambda: 1)
    transport = httpx.ASGITransport(app=metrics_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert 'cachelayer_loads_total{cache="web",outcome="success"} 1.0' in response.text


# --- with Redis -------------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_state_and_invalidations_are_exported(redis_url: str) -> None:
    registry = CollectorRegistry()
    writer = subscribed(
        Cache(redis_url, namespace="fleet", metrics=PrometheusMetrics(registry, cache_label="w"))
    )
    reader = subscribed(
        Cache(redis_url, namespace="fleet", metrics=PrometheusMetrics(registry, cache_label="r"))
    )
    try:
        writer.get_or_load("k", lambda: 1)
        reader.get_or_load("k", lambda: 2)  # found in Redis
        writer.delete("k")
        wait_for(lambda: reader.stats()["invalidations_received"] == 1, "the message arrived")
        inv = "cachelayer_invalidations_total"
        assert value(registry, inv, cache="w", source="local") == 1
        assert value(registry, inv, cache="r", source="remote") == 1
        assert value(registry, "cachelayer_requests_total", cache="r", tier="l2", result="hit") == 1
        assert value(registry, "cachelayer_subscribed", cache="r") == 1
        assert value(registry, "cachelayer_circuit_open", cache="r") == 0
        assert value(registry, "cachelayer_redis_healthy", cache="r") == 1
    finally:
        writer.close()
        reader.close()


@pytest.mark.redis
def test_invalidations_too_few_replicas_acknowledged_are_exported(redis_url: str) -> None:
    registry = CollectorRegistry()
    # One server with no replica: WAIT 1 answers 0, so no invalidation is ever confirmed.
    cache = subscribed(
        Cache(
            redis_url,
            namespace="lag",
            invalidation_replicas=1,
            metrics=PrometheusMetrics(registry),
        )
    )
    try:
        name = "cachelayer_invalidations_unconfirmed_total"
        assert value(registry, name, cache="lag") == 0
        cache.delete("k")
        # Queued, it is sent again (and unconfirmed again) every second: at least once.
        assert value(registry, name, cache="lag") >= 1
        assert value(registry, "cachelayer_invalidations_total", cache="lag", source="local") == 0
    finally:
        cache.close()


def test_an_l1_only_cache_exports_no_redis_gauges() -> None:
    registry = CollectorRegistry()
    Cache(None, namespace="l1", metrics=PrometheusMetrics(registry))
    for name in ("cachelayer_circuit_open", "cachelayer_subscribed", "cachelayer_origin_limit"):
        assert value(registry, name, cache="l1") is None


@pytest.mark.redis
def test_a_stopped_redis_opens_the_circuit_with_one_log_line_per_change(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    cache = subscribed(
        Cache(
            own_redis.url,
            namespace="cb",
            breaker_threshold=1,
            breaker_cooldown=3600,
            redis_timeout=0.25,
            metrics=PrometheusMetrics(registry),
        )
    )
    try:
        with caplog.at_level(logging.INFO, logger="cachelayer"):
            caplog.clear()
            own_redis.stop()
            for i in range(200):
                cache.get_or_load(f"k{i}", lambda: 1)
            wait_for(lambda: cache.stats()["subscribed"] is False, "the subscription dropped")
        assert value(registry, "cachelayer_circuit_open", cache="cb") == 1
        assert value(registry, "cachelayer_subscribed", cache="cb") == 0
        assert value(registry, "cachelayer_circuit_opened_total", cache="cb") == 1
        messages = [r.getMessage() for r in caplog.records]
        assert sum("circuit open" in m for m in messages) == 1
        # The state changes are: redis failed, circuit open, subscription lost (the bus and
        # the cache each say so today: see the report on issue 8). Never one per request.
        assert len(messages) <= 4, messages
    finally:
        cache.close()


def test_a_thousand_calls_at_info_log_nothing() -> None:
    logger = logging.getLogger("cachelayer")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.INFO)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        cache = Cache(None, namespace="quiet", metrics=PrometheusMetrics(CollectorRegistry()))
        fn = cache.cached()(lambda x: x)
        for i in range(1000):
            fn(i % 50)  # 50 misses and loads, 950 hits
            cache.get(f"absent{i}")  # misses
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert records == []


@pytest.mark.redis
def test_a_thousand_calls_through_redis_at_info_log_nothing_per_request(redis_url: str) -> None:
    logger = logging.getLogger("cachelayer")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    cache = subscribed(Cache(redis_url, namespace="quiet", l1_maxsize=0))
    handler = Keep(logging.INFO)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for i in range(1000):
            cache.get_or_load(f"k{i % 100}", lambda: {"id": 1})
            cache.get(f"absent{i}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
        cache.close()
    assert [r.getMessage() for r in records] == []


@pytest.mark.redis
def test_queued_invalidations_are_logged_once_per_episode(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cache = Cache(own_redis.url, namespace="q", redis_timeout=0.25, breaker_threshold=100)
    try:
        with caplog.at_level(logging.DEBUG, logger="cachelayer"):
            own_redis.stop()
            for i in range(5):  # each send fails, and takes the queue with it
                cache.delete(f"k{i}")
            own_redis.start()
            cache.delete("last")  # sends the queue as well
        events = [(r.levelno, getattr(r, "event", None)) for r in caplog.records]
        queued = [level for level, event in events if event == "invalidations_queued"]
        assert queued == [logging.WARNING] + [logging.DEBUG] * 4
        assert (logging.INFO, "invalidations_drained") in events
        assert not cache._pending
    finally:
        cache.close()
