"""Shared fixtures: private Redis servers, PostgreSQL, and a sync/async API switch.

Servers are real. A private ``redis-server`` is started on a free loopback port (no
persistence) when the binary exists; ``CACHELAYER_TEST_REDIS_URL`` points at an existing one
instead (tests that stop or restart a server then skip). When ``CACHELAYER_REQUIRE_SERVERS=1``
(CI sets it), a missing server fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.cluster

from cachelayer import Cache
from cachelayer._cluster_testing import RedisClusterServer
from cachelayer.testing import RedisServer

REQUIRE_SERVERS = os.environ.get("CACHELAYER_REQUIRE_SERVERS") == "1"


def missing(what: str) -> None:
    """Skip a test whose server is missing, or fail it where servers are required."""
    if REQUIRE_SERVERS:
        pytest.fail(f"{what} (CACHELAYER_REQUIRE_SERVERS=1)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | None]:
    """One private redis-server for the session (None when an external URL is used)."""
    if os.environ.get("CACHELAYER_TEST_REDIS_URL"):
        yield None
        return
    try:
        server = RedisServer().start()
    except FileNotFoundError:
        yield None
        return
    yield server
    server.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``on_cluster`` that use ``redis_url`` run on one server and on a Cluster."""
    if "redis_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "on_cluster"
    ):
        topologies = ["redis", pytest.param("cluster", marks=pytest.mark.cluster)]
        metafunc.parametrize("topology", topologies, indirect=True)


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> str:
    """Which deployment ``redis_url`` points at: ``redis`` (one server) or ``cluster``."""
    return getattr(request, "param", "redis")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    """One private 3-primary Redis Cluster for the session, started on first use."""
    try:
        deployment = RedisClusterServer().start()
    except FileNotFoundError as exc:
        missing(f"cannot start a Redis Cluster: {exc}")
        raise
    yield deployment
    deployment.stop()


@pytest.fixture
def redis_url(
    request: pytest.FixtureRequest, topology: str, redis_server: RedisServer | None
) -> str:
    """A URL of a real, empty Redis database (or Cluster, see ``on_cluster``)."""
    if topology == "cluster":
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        client = redis.cluster.RedisCluster.from_url(cluster.url)
        client.flushall()  # routed to every primary
        client.close()
        return cluster.cache_url
    url = os.environ.get("CACHELAYER_TEST_REDIS_URL") or (redis_server and redis_server.url)
    if not url:
        missing("no redis-server binary and no CACHELAYER_TEST_REDIS_URL")
    assert url
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to be stopped and restarted."""
    try:
        server = RedisServer().start()
    except FileNotFoundError:
        missing("no redis-server binary: this test stops and restarts its own server")
        raise
    yield server
    server.stop()


@pytest.fixture
def database_url() -> str:
    url = os.environ.get("CACHELAYER_TEST_DATABASE_URL")
    if not url:
        missing("CACHELAYER_TEST_DATABASE_URL is not set")
    assert url
    return url


class SyncAPI:
    """The sync methods, spelled so a behaviour test reads the same for both APIs."""

    name = "sync"

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def get(self, cache: Cache, key: str, default: Any = None) -> Any:
        return cache.get(key, default)

    def set(self, cache: Cache, key: str, value: Any, **kw: Any) -> None:
        cache.set(key, value, **kw)

    def delete(self, cache: Cache, *keys: str) -> None:
        cache.delete(*keys)

    def get_or_load(self, cache: Cache, key: str, loader: Callable[[], Any], **kw: Any) -> Any:
        return cache.get_or_load(key, loader, **kw)

    def decorate(self, cache: Cache, fn: Callable[..., Any], **kw: Any) -> Callable[..., Any]:
        return cache.cached(**kw)(fn)  # type: ignore[no-any-return]

    def close(self, cache: Cache) -> None:
        cache.close()

    def settle(self, cache: Cache, timeout: float = 5.0) -> None:
        """Wait until no load or background refresh of ``cache`` is running."""
        deadline = time.monotonic() + timeout
        while len(cache._flights) and time.monotonic() < deadline:
            self.pause(0.005)
        assert not len(cache._flights), "background work did not finish"

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)


class AsyncAPI(SyncAPI):
    """The async twins, driven to completion on one event loop per test."""

    name = "async"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, aw: Awaitable[Any]) -> Any:
        assert self.loop is not None
        return self.loop.run_until_complete(aw)

    def get(self, cache: Cache, key: str, default: Any = None) -> Any:
        return self.run(cache.aget(key, default))

    def set(self, cache: Cache, key: str, value: Any, **kw: Any) -> None:
        self.run(cache.aset(key, value, **kw))

    def delete(self, cache: Cache, *keys: str) -> None:
        self.run(cache.adelete(*keys))

    def get_or_load(self, cache: Cache, key: str, loader: Callable[[], Any], **kw: Any) -> Any:
        async def aloader() -> Any:
            # In a thread, so a loader that sleeps to be slow does not block the loop.
            return await asyncio.to_thread(loader)

        return self.run(cache.aget_or_load(key, aloader, **kw))

    def decorate(self, cache: Cache, fn: Callable[..., Any], **kw: Any) -> Callable[..., Any]:
        import functools

        @functools.wraps(fn)
        async def afn(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        wrapped = cache.cached(**kw)(afn)
        out = functools.wraps(fn)(lambda *a, **k: self.run(wrapped(*a, **k)))
        out.key = wrapped.key  # type: ignore[attr-defined]
        out.invalidate = lambda *a, **k: self.run(wrapped.ainvalidate(*a, **k))  # type: ignore[attr-defined]
        return out

    def close(self, cache: Cache) -> None:
        self.run(cache.aclose())

    def pause(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))  # lets background tasks on this loop run


@pytest.fixture(params=["sync", "async"])
def api(request: pytest.FixtureRequest) -> Iterator[SyncAPI]:
    """Runs a behaviour test once through the sync API and once through the async one."""
    impl = SyncAPI() if request.param == "sync" else AsyncAPI()
    yield impl
    if impl.loop is not None and not impl.loop.is_closed():
        impl.loop.close()


def wait_for(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def subscribed(cache: Cache) -> Cache:
    """Wait until ``cache`` hears invalidations: only then does it keep entries in L1."""
    cache._bus.start()
    assert cache._bus.ready.wait(5), "no pub/sub subscription within 5 s"
    return cache


@pytest.fixture
def make_cache(api: SyncAPI) -> Iterator[Callable[..., Cache]]:
    """Build caches (jitter off unless asked for) and close them through the API under test."""
    made: list[Cache] = []

    def make(redis: Any = None, **kw: Any) -> Cache:
        kw.setdefault("jitter", 0.0)
        cache = Cache(redis, **kw)
        made.append(cache)
        if redis is not None:
            subscribed(cache)
        return cache

    yield make
    for cache in made:
        api.close(cache)
