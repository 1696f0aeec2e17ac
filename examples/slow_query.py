"""A slow catalog query, before and after cachelayer.

    python examples/slow_query.py                       # in-process cache only
    REDIS_URL=redis://127.0.0.1:6379/0 python examples/slow_query.py   # L1 + Redis

The query is genuinely slow (SQLite aggregates 300,000 order rows for one product); nothing
sleeps. The first call pays for it; the rest are answered from the cache.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import time

from cachelayer import Cache

db = sqlite3.connect(":memory:", check_same_thread=False)
db.executescript(
    """
    CREATE TABLE orders (product_id INTEGER, quantity INTEGER, price_cents INTEGER);
    WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 299999)
    INSERT INTO orders SELECT i % 100, 1 + i % 5, 500 + i % 1000 FROM n;
    """
)
queries = 0

cache = Cache(os.environ.get("REDIS_URL") or None, namespace="example", ttl=60)


@cache.cached(key="product-stats:{product_id}")
def product_stats(product_id: int) -> dict[str, float]:
    """Sales figures for one product: a full scan of the orders table (no index)."""
    global queries
    queries += 1
    row = db.execute(
        "SELECT COUNT(*), SUM(quantity), AVG(price_cents) FROM orders WHERE product_id = ?",
        (product_id,),
    ).fetchone()
    return {"orders": row[0], "units": row[1], "avg_price": round(row[2] / 100, 2)}


def timed_us(fn: object, *args: object) -> float:
    start = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return (time.perf_counter() - start) * 1e6


def main() -> None:
    tiers = "L1 + Redis" if os.environ.get("REDIS_URL") else "L1 only (set REDIS_URL for Redis)"
    print(f"cachelayer example: {tiers}")
    cache.delete(product_stats.key(7))  # start cold even when Redis remembers a past run
    miss = timed_us(product_stats, 7)
    hits = [timed_us(product_stats, 7) for _ in range(10_000)]
    print(f"first call (runs the query):  {miss / 1000:9.2f} ms")
    print(f"next 10,000 calls (cached):   {statistics.median(hits):9.2f} us median")
    print(f"speed-up:                     {miss / statistics.median(hits):9.0f} x")
    print(f"database queries issued:      {queries:9d}")
    print(f"result: {product_stats(7)}")
    cache.close()


if __name__ == "__main__":
    main()
