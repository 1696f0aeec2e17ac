"""One replay: prepare the database, run the schedule without a cache and then with
cachelayer, clean up, and put both runs side by side with the targets.

The app runs in this process behind an ASGI transport by default. With ``serve=True`` it
runs under uvicorn in a child process on a free 127.0.0.1 port and this process is only the
load generator, so the two do not share an event loop (or a GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from . import db
from .app import build_app, make_cache
from .loadgen import Get, Progress, generate, httpx_get
from .metrics import summarize, targets
from .scenario import Scenario, SurgeError, distinct_keys_per_window, schedule
from .wire import LoopbackClient

RUNS = (("no cache", False), ("cachelayer", True))
SERVER_START_TIMEOUT = 30.0


def check_redis(url: str | None) -> None:
    """Fail early, with a message a person can act on, if ``url`` is not a reachable Redis.

    Any URL a ``Cache`` accepts will do: one server, ``redis+cluster://`` or
    ``redis+sentinel://``. Every node named in it (and, on a Cluster, every node the cluster
    announces) must be on this machine.
    """
    if not url:
        return
    import redis
    from redis.exceptions import RedisClusterException

    from cachelayer._clients import parse_target
    from cachelayer.exceptions import ConfigurationError
    from cachelayer.testing import redis_client

    try:
        target = parse_target(url)
    except ConfigurationError as exc:
        raise SurgeError(
            f"malformed Redis URL {db.redact(url)!r}: expected redis://host:port/db, "
            "redis+cluster://host:port[,host:port...] or "
            f"redis+sentinel://host:port[,host:port...]/service ({db.redact(str(exc))})"
        ) from None
    hosts = [host for host, _ in target.nodes] or [urllib.parse.urlsplit(url).hostname or ""]
    _refuse_remote(hosts)
    try:
        client = redis_client(url, timeout=2)  # a cluster client maps the slots here
        try:
            if hasattr(client, "get_nodes"):
                _refuse_remote([node.host for node in client.get_nodes()])
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, RedisClusterException, OSError) as exc:
        # Some are long (redis-py's "No master found" carries the client's repr): the start
        # of the message says what happened.
        reason = str(exc) if len(str(exc)) <= 200 else str(exc)[:200] + "..."
        raise SurgeError(f"cannot reach Redis at {db.redact(url)}: {reason}") from None


def tiers(url: str | None) -> str:
    """The cache's tiers as the report names them."""
    if not url:
        return "L1 only"
    from cachelayer._clients import CLUSTER, SENTINEL, parse_target

    kind = parse_target(url).kind
    return {CLUSTER: "L1 + Redis Cluster", SENTINEL: "L1 + Redis (Sentinel)"}.get(
        kind, "L1 + Redis"
    )


def _refuse_remote(hosts: list[str]) -> None:
    for host in hosts:
        if not db.is_loopback(host):
            raise SurgeError(f"refusing Redis at {host!r}: the replay only uses this machine")


def forget_namespace(url: str | None, namespace: str) -> None:
    """Delete the cached run's Redis keys: they would expire anyway, but leave no trace."""
    if not url:
        return
    import redis
    from redis.exceptions import RedisClusterException

    from cachelayer.testing import redis_client

    try:
        client = redis_client(url, timeout=5)  # on a Cluster, SCAN and DEL reach every node
        try:
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i : i + 500])
        finally:
            client.close()
    except (redis.RedisError, RedisClusterException, OSError):
        pass  # best effort: every key carries a TTL and expires on its own


@contextlib.asynccontextmanager
async def in_process(
    target: db.Target, sc: Scenario, cached: bool, redis_url: str | None, namespace: str
) -> AsyncIterator[tuple[httpx.AsyncClient, Get]]:
    shop = await db.connect(target, sc)
    cache = None
    try:
        cache = make_cache(sc, redis_url, namespace) if cached else None
        transport = httpx.ASGITransport(app=build_app(shop, cache))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.local") as client:
            yield client, httpx_get(client)
    finally:
        if cache is not None:
            await cache.aclose()
        await shop.close()


@contextlib.asynccontextmanager
async def served(
    target: db.Target, sc: Scenario, cached: bool, redis_url: str | None, namespace: str
) -> AsyncIterator[tuple[httpx.AsyncClient, Get]]:
    from cachelayer.testing import free_port

    port = free_port()
    spec = {
        "target": dataclasses.asdict(target),
        "scenario": dataclasses.asdict(sc),
        "cached": cached,
        "redis_url": redis_url,
        "namespace": namespace,
        "port": port,
    }
    # The spec travels on stdin, not argv: URLs may carry passwords, and argv is public.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cachelayer.surge.serve", stdin=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec).encode())
    await proc.stdin.drain()
    proc.stdin.close()
    load = LoopbackClient(port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await _wait_until_serving(client, proc)
            yield client, load.get
    finally:
        await load.aclose()
        if proc.returncode is None:
            proc.terminate()  # uvicorn shuts down gracefully: pool and cache are closed
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def _wait_until_serving(client: httpx.AsyncClient, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise SurgeError(f"the uvicorn server exited with code {proc.returncode} at start")
        try:
            (await client.get("/_surge/metrics", timeout=1.0)).raise_for_status()
            return
        except httpx.HTTPError:
            await asyncio.sleep(0.05)
    raise SurgeError(f"the uvicorn server did not answer within {SERVER_START_TIMEOUT:g}s")


async def replay(
    sc: Scenario,
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    serve: bool = False,
    progress: Callable[[str], Progress | None] | None = None,
) -> dict[str, Any]:
    """Run both runs of ``sc`` and return everything measured, ready for JSON.

    ``progress(run_name)`` may return a callback the generator calls while that run goes on.
    """
    if serve:
        _check_uvicorn()
    await asyncio.to_thread(check_redis, redis_url)
    make_cache(sc, None, "surge-check").close()  # refuse bad cache options before any work
    arrivals = schedule(sc)
    phases = sc.phases()
    target = await db.prepare(database_url, sc)
    runs: list[dict[str, Any]] = []
    started = time.time()
    try:
        for name, cached in RUNS:
            namespace = f"surge-{uuid.uuid4().hex[:12]}"
            app = served if serve else in_process
            try:
                async with app(target, sc, cached, redis_url, namespace) as (client, get):
                    log = await generate(
                        client,
                        get,
                        arrivals,
                        phases,
                        request_timeout=sc.request_timeout,
                        progress=progress(name) if progress else None,
                    )
                    app_metrics = (await client.get("/_surge/metrics", timeout=30)).json()
            finally:
                if cached:
                    await asyncio.to_thread(forget_namespace, redis_url, namespace)
            # A served app keeps waiting for a connection after the client gave up, so the
            # last queries may start up to the later of the two timeouts after the schedule.
            tail = max(sc.request_timeout, sc.pool_timeout)
            runs.append(summarize(name, arrivals, log, app_metrics, phases, sc.duration, tail))
            runs[-1]["cache_repr"] = app_metrics.get("cache_repr")
    finally:
        await db.drop(target)
    floor = distinct_keys_per_window(list(arrivals), sc.ttl)
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "scenario": dataclasses.asdict(sc),
        "phases": [dataclasses.asdict(p) for p in phases],
        "database": target.label,
        "table_prefix": target.prefix,
        "cache_tiers": tiers(redis_url),
        "app": "uvicorn on 127.0.0.1, generator in another process"
        if serve
        else "in process (ASGI)",
        "distinct_keys_per_ttl_window": floor,
        "runs": runs,
        "targets": targets(runs[0], runs[1], floor),
    }


def _check_uvicorn() -> None:
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise SurgeError("--serve needs uvicorn: pip install 'cachelayer[surge]'") from None


def run(sc: Scenario, **kwargs: Any) -> dict[str, Any]:
    """``replay`` from synchronous code (the CLI, the benchmark script, tests)."""
    return asyncio.run(replay(sc, **kwargs))
