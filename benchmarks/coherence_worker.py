"""A reader process for the invalidation coherence tests and benchmark.

    python benchmarks/coherence_worker.py URL NAMESPACE NAME

Reads the cached "price" (tagged "catalog") in a loop, from a "database" that is the Redis
key ``<NAMESPACE>:db``. Every invalidation it hears is acknowledged in ``<NAMESPACE>:ack:NAME``
with the database version at that moment and the time it arrived. It counts reads that
returned a version older than one already acknowledged: served after delivery, such a read
would be a coherence bug. Stops when ``<NAMESPACE>:stop`` exists; prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

from cachelayer import Cache
from cachelayer._invalidate import Invalidation
from cachelayer.testing import redis_client


def main() -> None:
    url, ns, name = sys.argv[1:4]
    r = redis_client(url)
    cache = Cache(url, namespace=ns, ttl=3600, jitter=0)
    acked = [0]

    def on_invalidate(event: Invalidation) -> None:
        if not event.local:
            arrived = time.time()  # before anything else: this is the delivery time
            version = int(r.get(f"{ns}:db") or 0)
            acked[0] = version
            r.rpush(f"{ns}:ack:{name}", json.dumps([version, arrived]))

    cache.on_invalidate(on_invalidate)
    cache.get("warm-up")
    cache._bus.ready.wait(5)
    r.rpush(f"{ns}:ready", name)
    reads = violations = 0
    while not r.exists(f"{ns}:stop"):
        floor = acked[0]
        value = cache.get_or_load("price", lambda: int(r.get(f"{ns}:db") or 0), tags=("catalog",))
        reads += 1
        violations += value < floor
    print(
        json.dumps({"reads": reads, "violations": violations, "l1_hits": cache.stats()["l1_hits"]})
    )
    cache.close()


if __name__ == "__main__":
    main()
