"""What invalidation costs: tagged hits, tag invalidation at scale, delivery across processes.

    python benchmarks/invalidation.py [--quick]

1. An L1 hit on a tagged entry against one on an untagged entry (target: at most 1.2x).
2. ``invalidate_tags`` on a tag carried by 100,000 entries in Redis against a tag carried by
   one (target: the same time: it is one version bump, whatever the count), and, reported
   apart, the local cost when those entries also sit in this process's L1.
3. Delivery of an invalidation to another process over pub/sub on loopback, p50/p99
   (target: p99 under 10 ms).

Uses a private redis-server, or REDIS_URL. Ratios are against baselines of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

import redis

from cachelayer import Cache
from cachelayer._codec import Entry, encode_value, pack_entry
from cachelayer.testing import RedisServer

WORKER = str(Path(__file__).with_name("coherence_worker.py"))


def spread(samples: list[float], unit: float) -> str:
    return " ".join(f"{f(samples) / unit:9.2f}" for f in (min, statistics.median, max))


def subscribed(cache: Cache) -> Cache:
    cache._bus.start()
    if not cache._bus.ready.wait(5):
        raise SystemExit("no pub/sub subscription")
    return cache


def tagged_hits(url: str, number: int, repeat: int) -> None:
    cache = subscribed(Cache(url, namespace="bench-tags", ttl=3600))
    value = {"id": 1, "name": "lamp"}
    plain = cache.cached()(lambda x: value)
    tagged = cache.cached(tags=("catalog", "products"))(lambda x: value)
    plain(1), tagged(1)
    assert cache.stats()["l1_entries"] == 2
    timers = {
        "untagged": timeit.Timer("f(1)", globals={"f": plain}),
        "tagged (2 tags)": timeit.Timer("f(1)", globals={"f": tagged}),
    }
    samples: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(repeat):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(number) / number)
    base = statistics.median(samples["untagged"])
    print("\n1. L1 hit, ns per call           min    median       max   x untagged")
    for name, s in samples.items():
        print(f"   {name:24s} {spread(s, 1e-9)}   {statistics.median(s) / base:6.2f}")
    cache.close()


def tag_invalidation(url: str, repeat: int, entries: int) -> None:
    client = redis.Redis.from_url(url)
    cache = subscribed(Cache(url, namespace="bench-inv", ttl=3600))
    now = time.time()
    payload = encode_value({"id": 0})
    pipe = client.pipeline(transaction=False)
    for i in range(entries):
        entry = Entry(None, payload, now, now + 3600, now + 3600, 0.001, ("big",), (0,))
        pipe.set(f"bench-inv:v1:{{p{i}}}", pack_entry(entry), px=3_600_000)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.set(
        "bench-inv:v1:{solo}",
        pack_entry(Entry(None, payload, now, now + 3600, now + 3600, 0.001, ("small",), (0,))),
    )
    pipe.execute()
    samples: dict[str, list[float]] = {f"tag on {entries:,} entries": [], "tag on 1 entry": []}
    for _ in range(repeat):
        for name, tag in zip(samples, ("big", "small"), strict=True):
            start = time.perf_counter()
            cache.invalidate_tags(tag)
            samples[name].append(time.perf_counter() - start)
    base = statistics.median(samples["tag on 1 entry"])
    print("\n2. invalidate_tags, ms per call   min    median       max   x one entry")
    for name, s in samples.items():
        print(f"   {name:24s} {spread(s, 1e-3)}   {statistics.median(s) / base:6.2f}")
    # The same tag with the entries also in this process's L1: dropping them is local work.
    local = Cache(None, ttl=3600, l1_maxsize=entries + 1)
    for i in range(entries):
        local.set(f"p{i}", i, tags=("big",))
    assert len(local._l1) == entries
    start = time.perf_counter()
    local.invalidate_tags("big")
    took = time.perf_counter() - start
    assert len(local._l1) == 0
    print(
        f"   (with {entries:,} of them in this process's L1 too: {took * 1000:.1f} ms, "
        "to drop them from memory)"
    )
    cache.close()
    client.close()


def delivery(url: str, count: int) -> None:
    client = redis.Redis.from_url(url)
    ns = f"bench-deliver{os.getpid()}"
    client.set(f"{ns}:db", 0)
    reader = subprocess.Popen(
        [sys.executable, WORKER, url, ns, "r0"], stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 20
        while not client.llen(f"{ns}:ready"):
            if time.time() > deadline:
                raise SystemExit("reader did not start")
            time.sleep(0.01)
        writer = subscribed(Cache(url, namespace=ns))
        latencies = []
        for version in range(1, count + 1):
            client.set(f"{ns}:db", version)
            sent = time.time()
            writer.delete("price") if version % 2 else writer.invalidate_tags("catalog")
            _, raw = client.blpop([f"{ns}:ack:r0"], timeout=5) or (None, None)
            if raw is None:
                raise SystemExit("an invalidation was not delivered")
            latencies.append(json.loads(raw)[1] - sent)
            time.sleep(0.002)
        writer.close()
    finally:
        client.set(f"{ns}:stop", 1)
        out = reader.communicate(timeout=20)[0]
    result = json.loads(out.strip().splitlines()[-1])
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    print(f"\n3. delivery to another process over pub/sub, {count} invalidations")
    print(
        f"   p50 {p(0.5):.2f} ms   p99 {p(0.99):.2f} ms   max {latencies[-1] * 1000:.2f} ms   "
        f"(reader served {result['reads']} reads, {result['violations']} older than a "
        "delivered invalidation)"
    )
    print(f"   target p99 < 10 ms: {'met' if p(0.99) < 10 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL")
    server = None if url else RedisServer().start()
    url = url or server.url  # type: ignore[union-attr]
    try:
        print(f"Python {sys.version.split()[0]}, {os.cpu_count()} cores")
        tagged_hits(url, 50_000 if args.quick else 300_000, 3 if args.quick else 7)
        tag_invalidation(url, 5 if args.quick else 15, 10_000 if args.quick else 100_000)
        delivery(url, 100 if args.quick else 500)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
