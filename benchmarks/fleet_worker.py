"""One process of a simulated fleet, for the fleet-wide single-flight tests and benchmark.

    python benchmarks/fleet_worker.py URL NS KEY CALLERS MODE START LOAD_SECONDS [LEASE_TTL [LEASE]]

MODE is "async" (CALLERS tasks) or "threads". Every caller waits for wall-clock START, then
asks for KEY. The loader counts itself in Redis (``<NAMESPACE>:loads``), sleeps, and returns
a value naming this process. Prints one JSON line: results and each caller's latency
measured from START.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time

from cachelayer import Cache
from cachelayer.testing import redis_client


def main() -> None:
    url, ns, key, callers, mode, start, load_s = sys.argv[1:8]
    lease_ttl = float(sys.argv[8]) if len(sys.argv) > 8 else 10.0
    lease = sys.argv[9] != "0" if len(sys.argv) > 9 else True
    n, start_at, load_seconds = int(callers), float(start), float(load_s)
    counter = redis_client(url)
    cache = Cache(url, namespace=ns, lease_ttl=lease_ttl, lease=lease, jitter=0)
    cache.get_or_load("warm-up", lambda: 1)  # connects, and starts the pub/sub listener
    cache._bus.ready.wait(5)
    me = f"pid-{os.getpid()}"
    print(json.dumps({"ready": me}), flush=True)

    def load() -> str:
        counter.incr(f"{ns}:loads")
        time.sleep(load_seconds)
        return me

    async def aload() -> str:
        counter.incr(f"{ns}:loads")
        await asyncio.sleep(load_seconds)
        return me

    results: list[tuple[str, float]] = []
    lock = threading.Lock()

    def record(value: str) -> None:
        with lock:
            results.append((value, time.time() - start_at))

    if mode == "async":

        async def run() -> None:
            await asyncio.sleep(max(0.0, start_at - time.time()))

            async def one() -> None:
                record(await cache.aget_or_load(key, aload))

            await asyncio.gather(*(one() for _ in range(n)))
            await cache.aclose()

        asyncio.run(run())
    else:

        def one() -> None:
            time.sleep(max(0.0, start_at - time.time()))
            record(cache.get_or_load(key, load))

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps({"values": [v for v, _ in results], "latency": [t for _, t in results]}))
    cache.close()


if __name__ == "__main__":
    main()
