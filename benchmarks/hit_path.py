"""What a cache hit costs: cachelayer against plain calls, the stdlib and peers, in one run.

    python benchmarks/hit_path.py            # full run (about a minute)
    python benchmarks/hit_path.py --quick    # fewer repeats, for a smoke check

In-process (L1) hits are timed as ns per call of a decorated one-argument function whose value
is cached. The Redis (L2) hit is timed with L1 disabled against raw redis-py ``GET`` +
``msgpack.unpackb`` of the same ~1 KB dict on the same server: a private redis-server started
here, or ``REDIS_URL``. Absolute times drift on shared machines, so every row is also given
as a ratio to a baseline measured in the same run; each figure is min/median/max over repeats.
Peers that are not installed (aiocache, cashews) are reported as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import timeit
from collections.abc import Callable, Coroutine
from typing import Any

import cachetools
import msgpack
import redis

from cachelayer import Cache
from cachelayer.testing import RedisServer

BASELINE = "cachetools.cached(TTLCache)"
METERED = "cachelayer sync, L1 hit, PrometheusMetrics"
Row = tuple[str, list[float]]  # name, seconds per call for each repeat


def time_sync(cases: list[tuple[str, Callable[[int], Any]]], number: int, repeat: int) -> list[Row]:
    """Seconds per call of each case; repeats are interleaved so drift hits every row alike."""
    timers = []
    for name, fn in cases:
        fn(42)
        timers.append((name, timeit.Timer("fn(42)", globals={"fn": fn})))
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(repeat):
        for name, timer in timers:
            samples[name].append(timer.timeit(number) / number)
    return list(samples.items())


def time_async(
    cases: list[tuple[str, Callable[[int], Coroutine[Any, Any, Any]], int]], repeat: int
) -> list[Row]:
    """Like ``time_sync`` for coroutine functions, each awaited ``number`` times in a loop."""

    async def run() -> list[Row]:
        loop = asyncio.get_running_loop()
        samples: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for _, fn, _ in cases:
            await fn(42)
        for _ in range(repeat):
            for name, fn, number in cases:
                start = loop.time()
                for _ in range(number):
                    await fn(42)
                samples[name].append((loop.time() - start) / number)
        return list(samples.items())

    return asyncio.run(run())


def fmt(samples: list[float], unit: float) -> str:
    lo, med, hi = min(samples), statistics.median(samples), max(samples)
    return f"{lo / unit:8.0f} {med / unit:8.0f} {hi / unit:8.0f}"


def report(title: str, unit_name: str, unit: float, rows: list[Row], baseline: str) -> None:
    base = statistics.median(dict(rows)[baseline])
    print(f"\n{title}")
    print(f"{'':44s} {unit_name + ' min':>8s} {'median':>8s} {'max':>8s}   x {baseline}")
    for name, samples in rows:
        ratio = statistics.median(samples) / base
        print(f"{name:44s} {fmt(samples, unit)}   {ratio:6.2f}")


def l1_rows(number: int, repeat: int) -> list[Row]:
    value = {"id": 42, "name": "product 42", "price": "9.99"}

    def plain(x: int) -> Any:
        return value

    lru = functools.lru_cache(maxsize=10_000)(plain)
    ttl_cached = cachetools.cached(cachetools.TTLCache(maxsize=10_000, ttl=600))(plain)
    cache = Cache(None, ttl=600)
    cl_sync = cache.cached()(plain)
    cl_template = cache.cached(key="product:{x}")(plain)

    def by_str(x: int) -> Any:
        return value

    cl_str = cache.cached()(by_str)
    cases: list[tuple[str, Callable[[int], Any]]] = [
        ("plain call (no cache)", plain),
        ("functools.lru_cache", lru),
        ("cachetools.cached(TTLCache)", ttl_cached),
        ("cachelayer sync, L1 hit (default key)", cl_sync),
        ("cachelayer sync, L1 hit (template key)", cl_template),
        ("cachelayer sync, L1 hit (str argument)", lambda _: cl_str("session-42")),
    ]
    try:
        from prometheus_client import CollectorRegistry

        from cachelayer.metrics import PrometheusMetrics

        metered = Cache(None, ttl=600, metrics=PrometheusMetrics(CollectorRegistry()))
        cases.append((METERED, metered.cached()(plain)))
    except ImportError:
        print("prometheus-client not installed: the metrics row is skipped", file=sys.stderr)
    rows = time_sync(cases, number, repeat)

    async def aplain(x: int) -> Any:
        return value

    acache = Cache(None, ttl=600)
    peer_number = max(number // 10, 1000)
    acases: list[tuple[str, Callable[[int], Coroutine[Any, Any, Any]], int]] = [
        ("async def, plain await (no cache)", aplain, number),
        ("cachelayer async, L1 hit", acache.cached()(aplain), number),
    ]
    try:
        from aiocache import cached as aio_cached

        acases.append(("aiocache @cached (memory)", aio_cached(ttl=600)(aplain), peer_number))
    except ImportError:
        print("aiocache not installed: skipped", file=sys.stderr)
    try:
        from cashews import Cache as CashewsCache

        cw = CashewsCache()
        cw.setup("mem://")
        acases.append(("cashews @cache (mem://)", cw(ttl=600)(aplain), peer_number))
    except ImportError:
        print("cashews not installed: skipped", file=sys.stderr)
    rows += time_async(acases, repeat)
    return rows


def l2_rows(url: str, number: int, repeat: int) -> list[Row]:
    value = {f"field_{i}": "x" * 20 for i in range(35)}  # about 1 KB once packed
    raw = redis.Redis.from_url(url)
    raw.set("bench:raw", msgpack.packb(value))
    cache = Cache(url, namespace="bench", l1_maxsize=0, ttl=600)
    cache.set("product:42", value)
    assert cache.get("product:42") == value

    def raw_get(_: int) -> Any:
        return msgpack.unpackb(raw.get("bench:raw"))

    def cl_get(_: int) -> Any:
        return cache.get("product:42")

    loaded = cache.cached(key="p:{x}")(lambda x: value)

    rows = time_sync(
        [
            ("raw redis-py GET + msgpack.unpackb", raw_get),
            ("cachelayer get(), L2 hit (L1 off)", cl_get),
            ("cachelayer @cached, L2 hit (L1 off)", loaded),
        ],
        number,
        repeat,
    )
    print(f"(L2 value: {len(msgpack.packb(value))} bytes packed)")
    cache.close()
    raw.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args()
    repeat = args.repeat or (3 if args.quick else 7)
    number = 50_000 if args.quick else 300_000

    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} cores; {repeat} repeats")
    rows = l1_rows(number, repeat)
    report("L1 hit: ns per call", "ns", 1e-9, rows, "cachetools.cached(TTLCache)")
    med = {name: statistics.median(samples) for name, samples in rows}
    hit, async_hit = med["cachelayer sync, L1 hit (default key)"], med["cachelayer async, L1 hit"]
    targets = [
        ("sync L1 hit / cachetools.cached(TTLCache)", hit / med[BASELINE], 0.6),
        ("async L1 hit, in us", async_hit / 1e-6, 1.0),
    ]
    if METERED in med:  # counting is the core's anyway: metrics must add at most 10%
        targets.append(("L1 hit with PrometheusMetrics / without", med[METERED] / hit, 1.10))
    for peer in ("aiocache @cached (memory)", "cashews @cache (mem://)"):
        if peer in med:
            targets.append((f"async L1 hit / {peer}", async_hit / med[peer], 1 / 20))

    url = os.environ.get("REDIS_URL")
    server = None
    if url is None:
        try:
            server = RedisServer().start()
            url = server.url
        except FileNotFoundError:
            print("\nL2 rows skipped: no redis-server and no REDIS_URL")
    if url is not None:
        try:
            l2 = l2_rows(url, number // 30, repeat)
        finally:
            if server is not None:
                server.stop()
        report("L2 hit: us per call", "us", 1e-6, l2, "raw redis-py GET + msgpack.unpackb")
        med = {name: statistics.median(samples) for name, samples in l2}
        base = med["raw redis-py GET + msgpack.unpackb"]
        for name in ("cachelayer get(), L2 hit (L1 off)", "cachelayer @cached, L2 hit (L1 off)"):
            targets.append((f"{name} / raw", med[name] / base, 1.15))

    print("\nTargets, on this run's medians")
    for name, value, limit in targets:
        verdict = "met" if value <= limit else "NOT met"
        print(f"  {name:58s} {value:7.3f}  (at most {limit:.3f}): {verdict}")


if __name__ == "__main__":
    main()
