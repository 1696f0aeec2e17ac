"""Prometheus metrics for a ``Cache``: counts read at scrape time, histograms off the hit path.

    from prometheus_client import CollectorRegistry
    from cachelayer import Cache
    from cachelayer.metrics import PrometheusMetrics, metrics_app

    registry = CollectorRegistry()
    cache = Cache(redis_url, namespace="shop", metrics=PrometheusMetrics(registry))
    app.mount("/metrics", metrics_app(registry))

Why a custom collector: the core already keeps every count as a plain integer (``Cache.stats()``)
and bumps it without a lock. Mirroring those into prometheus-client ``Counter`` objects would put
a lock and a label lookup on every hit; reading the integers when Prometheus scrapes costs the
hit path nothing. Only durations need one call per event, and those events (a load ended, a load
waited for an origin slot) never happen on a hit.

One collector and two histograms are registered per registry, the first time a cache is bound
to it; each cache is a ``cache`` label value (its namespace unless ``cache_label`` is given), so
caches can share a registry without duplicated time series, or use registries of their own.
Nothing is registered at import time, and prometheus-client is imported only when a
``PrometheusMetrics`` is made.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._observe import Observer
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.metrics_core import Metric

    from ._cache import Cache

__all__ = ["LOAD_BUCKETS", "WAIT_BUCKETS", "Observer", "PrometheusMetrics", "metrics_app"]

# Loads are database queries: from a millisecond to the point where someone files a ticket.
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A wait for an origin slot is bounded by origin_wait (1 s by default).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_STALE_REASONS = ("swr", "fail_safe", "soft_timeout", "overload", "lease_timeout")

# (name, documentation, stats() field) for counters that are one field each.
_SIMPLE_COUNTERS = (
    ("cachelayer_backend_errors", "Redis operations that failed.", "backend_errors"),
    ("cachelayer_circuit_opened", "Times the Redis circuit breaker opened.", "breaker_opened"),
    (
        "cachelayer_backend_skipped",
        "Redis calls not made because the circuit was open.",
        "breaker_skips",
    ),
    (
        "cachelayer_l1_evictions",
        "Entries evicted from L1 to stay within l1_maxsize.",
        "l1_evictions",
    ),
    (
        "cachelayer_refreshes",
        "Background refreshes started (stale-while-revalidate, early).",
        "refreshes",
    ),
    (
        "cachelayer_fenced_writes",
        "Loaded values not stored: invalidated meanwhile.",
        "fenced_writes",
    ),
    (
        "cachelayer_serialization_errors",
        "Loaded values that could not be encoded (served, not stored).",
        "serialization_errors",
    ),
    ("cachelayer_corrupt_entries", "Undecodable bytes found in Redis (a miss).", "corrupt_entries"),
    (
        "cachelayer_subscription_losses",
        "Times the invalidation subscription was lost.",
        "subscription_losses",
    ),
    (
        "cachelayer_invalidations_unconfirmed",
        "Invalidations sent that too few replicas acknowledged in time (invalidation_replicas); "
        "each stays queued and is sent again.",
        "invalidations_unconfirmed",
    ),
)

# Gauges that are one field each; a field that is None (no Redis, no origin limit) is left out.
_SIMPLE_GAUGES = (
    (
        "cachelayer_loads_in_flight",
        "Loader calls running now (origin guard slots in use).",
        "loads_in_flight",
    ),
    (
        "cachelayer_origin_limit",
        "Origin guard size (origin_limit); absent when unlimited.",
        "origin_limit",
    ),
    ("cachelayer_origin_waiting", "Loads queued for an origin slot now.", "origin_waiting"),
    ("cachelayer_l1_entries", "Entries held in L1 now.", "l1_entries"),
    ("cachelayer_circuit_open", "1 while the Redis circuit breaker is open.", "circuit_open"),
    ("cachelayer_redis_healthy", "1 while the last Redis call succeeded.", "redis_healthy"),
    ("cachelayer_subscribed", "1 while subscribed to invalidations (L1 trusted).", "subscribed"),
)


def loads_saved(stats: dict[str, Any]) -> int:
    """Loader calls avoided: callers served without a load of their own.

    Fresh hits in either tier, callers that shared another caller's load in this process, and
    callers served stale. Other processes' loads (``fleet_coalesced``) are not added: the core
    counts such a caller as an L2 hit already.
    """
    stale = sum(stats[f"stale_{reason}"] for reason in _STALE_REASONS)
    return int(stats["l1_hits"] + stats["l2_hits"] + stats["coalesced"] + stale)


class _Bound:
    """One cache observed in a registry: its label, a weak reference, its load outcomes."""

    __slots__ = ("cache", "label", "successes")

    def __init__(self, label: str, cache: Cache) -> None:
        self.label = label
        self.cache: weakref.ref[Cache] = weakref.ref(cache)
        # The core counts loads as they start and errors as they end; successes are counted
        # here as they end, so no exported counter ever goes down (loads - errors could).
        self.successes = 0


class _Shared:
    """What one registry holds for every cache bound to it: the collector, two histograms."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Histogram

        self.lock = threading.Lock()
        self.bound: dict[str, _Bound] = {}
        self.load_duration: Histogram = Histogram(
            "cachelayer_load_duration_seconds",
            "Loader call durations (database queries), successful or not.",
            ["cache"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.origin_wait: Histogram = Histogram(
            "cachelayer_origin_wait_seconds",
            "Time loads waited for an origin guard slot (granted or shed).",
            ["cache"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        registry.register(_Collector(self))

    def add(self, label: str, cache: Cache) -> _Bound:
        with self.lock:
            held = self.bound.get(label)
            if held is not None and held.cache() is not None:
                raise ConfigurationError(
                    f"a cache labelled {label!r} is already exported to this registry; give "
                    "PrometheusMetrics(cache_label=...) a distinct name, or another registry"
                )
            bound = self.bound[label] = _Bound(label, cache)
        # When the cache is gone, its series go too (and the label may be reused).
        weakref.finalize(cache, self.remove, label, bound)
        return bound

    def remove(self, label: str, bound: _Bound) -> None:
        with self.lock:
            if self.bound.get(label) is not bound:
                return
            del self.bound[label]
            for histogram in (self.load_duration, self.origin_wait):
                try:
                    histogram.remove(label)
                except KeyError:  # never observed
                    pass

    def snapshot(self) -> list[tuple[_Bound, dict[str, Any]]]:
        with self.lock:
            bound = list(self.bound.values())
        out = []
        for b in bound:
            cache = b.cache()
            if cache is not None:
                out.append((b, cache.stats()))
        return out


_shared: weakref.WeakKeyDictionary[Any, _Shared] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def _shared_for(registry: CollectorRegistry) -> _Shared:
    with _shared_lock:
        shared = _shared.get(registry)
        if shared is None:
            shared = _shared[registry] = _Shared(registry)
        return shared


class PrometheusMetrics:
    """A metrics observer exporting one ``Cache`` to Prometheus: ``Cache(metrics=...)``.

    Args:
        registry: the ``prometheus_client.CollectorRegistry`` to export to; None for
            prometheus-client's default ``REGISTRY``.
        cache_label: the ``cache`` label value of this cache's series; default: its
            namespace. Two caches exported to one registry need distinct labels.

    Make one per cache. Counts come from ``Cache.stats()`` when the registry is collected;
    load durations and origin waits are observed as they happen (never on a hit).
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, cache_label: str | None = None
    ) -> None:
        try:
            import prometheus_client
        except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
            raise ImportError(
                "PrometheusMetrics needs prometheus-client: pip install 'cachelayer[prometheus]'"
            ) from exc
        if cache_label is not None and (not isinstance(cache_label, str) or not cache_label):
            raise ConfigurationError(f"cache_label must be a non-empty string, got {cache_label!r}")
        self.registry: CollectorRegistry = (
            prometheus_client.REGISTRY if registry is None else registry
        )
        self.cache_label = cache_label
        self._bound: _Bound | None = None
        # Until bound, observations go nowhere (the core binds before it can load anything).
        self._load: Callable[[float], None] = _ignore
        self._wait: Callable[[float], None] = _ignore

    def bind(self, cache: Cache) -> None:
        if self._bound is not None:
            raise ConfigurationError("a PrometheusMetrics observes one cache; make one per cache")
        label = self.cache_label or cache.namespace
        shared = _shared_for(self.registry)
        self._bound = shared.add(label, cache)
        # Label children resolved once: an observation is then one histogram update.
        self._load = shared.load_duration.labels(label).observe
        self._wait = shared.origin_wait.labels(label).observe

    def load_finished(self, seconds: float, outcome: str) -> None:
        self._load(seconds)
        bound = self._bound
        if bound is not None and outcome == "success":
            bound.successes += 1

    def origin_waited(self, seconds: float) -> None:
        self._wait(seconds)


def _ignore(seconds: float) -> None:
    pass


def metrics_app(registry: CollectorRegistry | None = None) -> Any:
    """An ASGI app serving ``registry`` (default: prometheus-client's ``REGISTRY``) in the
    Prometheus text format, to mount at ``/metrics``: prometheus-client's own app."""
    import prometheus_client

    return prometheus_client.make_asgi_app(
        prometheus_client.REGISTRY if registry is None else registry
    )


class _Collector:
    """Turns every bound cache's ``stats()`` into metric families when the registry is read."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared

    def describe(self) -> list[Metric]:
        # Names only, so registering never calls collect() (which reads live caches).
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        for bound, stats in self.shared.snapshot():
            _fill(families, bound, stats)
        yield from families.values()

    @staticmethod
    def _families() -> dict[str, Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c, g = CounterMetricFamily, GaugeMetricFamily
        families: dict[str, Any] = {
            "requests": c(
                "cachelayer_requests",
                "Cache calls by tier and result (see docs/operations/metrics.md).",
                labels=["cache", "tier", "result"],
            ),
            "loads": c(
                "cachelayer_loads",
                "Loads by outcome: success, error (loader raised), timeout (a caller gave up at "
                "hard_timeout), shed (refused an origin slot).",
                labels=["cache", "outcome"],
            ),
            "coalesced": c(
                "cachelayer_coalesced",
                "Callers served by another caller's load: in this process, or across the fleet.",
                labels=["cache", "scope"],
            ),
            "stale": c(
                "cachelayer_stale_served",
                "Stale values served, by reason.",
                labels=["cache", "reason"],
            ),
            "saved": c(
                "cachelayer_loads_saved",
                "Loader calls avoided (database queries saved): hits + coalesced + stale served.",
                labels=["cache"],
            ),
            "invalidations": c(
                "cachelayer_invalidations",
                "Invalidations sent by this process (source=local) or heard from others "
                "(source=remote).",
                labels=["cache", "source"],
            ),
        }
        for name, doc, _ in _SIMPLE_COUNTERS:
            families[name] = c(name, doc, labels=["cache"])
        for name, doc, _ in _SIMPLE_GAUGES:
            families[name] = g(name, doc, labels=["cache"])
        return families


def _fill(families: dict[str, Any], bound: _Bound, s: dict[str, Any]) -> None:
    cache = bound.label
    requests = families["requests"]
    requests.add_metric([cache, "l1", "hit"], s["l1_hits"])
    requests.add_metric([cache, "l2", "hit"], s["l2_hits"])
    # The core counts a miss when L1 cannot answer, before Redis is asked (``get`` counts it
    # after Redis too): so tier="l1". Stale values come from either tier: tier="any".
    requests.add_metric([cache, "l1", "miss"], s["misses"])
    stale = sum(s[f"stale_{reason}"] for reason in _STALE_REASONS)
    requests.add_metric([cache, "any", "stale"], stale)
    loads = families["loads"]
    loads.add_metric([cache, "success"], bound.successes)
    loads.add_metric([cache, "error"], s["load_errors"])
    loads.add_metric([cache, "timeout"], s["load_timeouts"])
    loads.add_metric([cache, "shed"], s["origin_refused"])
    families["coalesced"].add_metric([cache, "local"], s["coalesced"])
    families["coalesced"].add_metric([cache, "fleet"], s["fleet_coalesced"])
    for reason in _STALE_REASONS:
        families["stale"].add_metric([cache, reason], s[f"stale_{reason}"])
    families["saved"].add_metric([cache], loads_saved(s))
    families["invalidations"].add_metric([cache, "local"], s["invalidations_sent"])
    families["invalidations"].add_metric([cache, "remote"], s["invalidations_received"])
    for name, _, field in _SIMPLE_COUNTERS:
        families[name].add_metric([cache], s[field])
    for name, _, field in _SIMPLE_GAUGES:
        value = s[field]
        if value is not None:
            families[name].add_metric([cache], float(value))
