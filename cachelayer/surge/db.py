"""The shop's database: SQLite (default, stdlib) or PostgreSQL (asyncpg), behind ``Pool``.

The replay's driver calls ``prepare`` once (create and seed tables under a unique prefix),
the app calls ``connect`` (its own pool of connections to those tables, possibly in another
process), and the driver calls ``drop`` at the end, whatever happened. Query latency comes
from the database doing real work: catalog pages rank a category's products by their
reviews, as a shop's product page does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import random
import re
import sqlite3
import tempfile
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .pool import Pool, Rows
from .scenario import Scenario, SurgeError

CONNECT_TIMEOUT = 5.0

SCHEMA = """
CREATE TABLE {p}products (id INTEGER PRIMARY KEY, category_id INTEGER NOT NULL,
    name TEXT NOT NULL, price_cents INTEGER NOT NULL, stock INTEGER NOT NULL);
CREATE TABLE {p}reviews (id INTEGER PRIMARY KEY, product_id INTEGER NOT NULL,
    rating INTEGER NOT NULL, body TEXT NOT NULL);
CREATE TABLE {p}cart_items (session_id TEXT NOT NULL, product_id INTEGER NOT NULL,
    qty INTEGER NOT NULL, PRIMARY KEY (session_id, product_id));
CREATE INDEX {p}products_category ON {p}products (category_id);
CREATE INDEX {p}reviews_product ON {p}reviews (product_id)
"""
TABLES = ("cart_items", "reviews", "products")

# The product page shows the product's rating and its rank within its category, so one
# product read aggregates the reviews of every product in that category.
PRODUCT_SQL = """
SELECT id, name, price_cents, stock, reviews, rating, rank FROM (
  SELECT p.id, p.name, p.price_cents, p.stock, count(*) AS reviews, avg(r.rating) AS rating,
         rank() OVER (ORDER BY avg(r.rating) DESC) AS rank
  FROM {p}products p JOIN {p}reviews r ON r.product_id = p.id
  WHERE p.category_id = (SELECT category_id FROM {p}products WHERE id = $1)
  GROUP BY p.id, p.name, p.price_cents, p.stock
) ranked WHERE id = $1
"""
CATEGORY_SQL = """
SELECT p.id, p.name, p.price_cents, avg(r.rating) AS rating, count(*) AS reviews
FROM {p}products p JOIN {p}reviews r ON r.product_id = p.id
WHERE p.category_id = $1
GROUP BY p.id, p.name, p.price_cents
ORDER BY rating DESC, p.id LIMIT 10
"""
CART_SQL = """
SELECT c.product_id, p.name, c.qty, p.price_cents * c.qty
FROM {p}cart_items c JOIN {p}products p ON p.id = c.product_id
WHERE c.session_id = $1 ORDER BY c.product_id
"""


def session_token(n: int) -> str:
    return f"sess-{n:06d}"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the shop's tables live: enough for another process to connect to them."""

    kind: str  # "sqlite" or "postgresql"
    location: str  # a file path, or a PostgreSQL URL
    prefix: str  # every table name starts with it, so a replay never touches other tables
    temporary_dir: str = ""  # removed by drop() when the replay made it

    @property
    def label(self) -> str:
        if self.kind == "sqlite":
            return f"SQLite {sqlite3.sqlite_version}"
        parts = urllib.parse.urlsplit(self.location)
        return f"PostgreSQL at {parts.hostname or 'local socket'}:{parts.port or 5432}"


def is_loopback(host: str) -> bool:
    if host in ("", "localhost") or host.startswith("/"):
        return True  # no host, or a Unix socket directory: this machine
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_database_url(url: str | None) -> tuple[str, str]:
    """(kind, location) for a URL; None means a throwaway SQLite file."""
    if not url:
        return "sqlite", ""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.lower().startswith("sqlite:///") else ""
        if not path:
            raise SurgeError(f"malformed SQLite URL {url!r}: use sqlite:///path/to/file.db")
        return "sqlite", path
    if scheme in ("postgresql", "postgres"):
        try:
            parts = urllib.parse.urlsplit(url)
            host, _port = parts.hostname or "", parts.port
        except ValueError as exc:
            raise SurgeError(f"malformed PostgreSQL URL {redact(url)!r}: {exc}") from None
        query_host = urllib.parse.parse_qs(parts.query).get("host", [""])[0]
        if not is_loopback(host or query_host):
            raise SurgeError(
                f"refusing to replay a surge against {host!r}: the replay only targets this "
                "machine (localhost, 127.0.0.1, ::1 or a Unix socket)"
            )
        return "postgresql", url
    raise SurgeError(
        f"malformed database URL {redact(url)!r}: expected postgresql://... or sqlite:///..."
    )


def redact(url: str) -> str:
    """``url`` with its password masked, for messages."""
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


def _seed_rows(sc: Scenario) -> tuple[list[tuple[Any, ...]], ...]:
    rng = random.Random(sc.seed)
    products = [
        (
            i,
            (i - 1) % sc.categories + 1,
            f"product {i}",
            rng.randrange(199, 99_999),
            rng.randrange(50),
        )
        for i in range(1, sc.keys + 1)
    ]
    body = "Arrived quickly, works as described, would buy again."
    reviews = [
        ((i - 1) * sc.reviews + j + 1, i, rng.randint(1, 5), body)
        for i in range(1, sc.keys + 1)
        for j in range(sc.reviews)
    ]
    carts = []
    for s in range(1, sc.sessions + 1):
        for pid in sorted(rng.sample(range(1, sc.keys + 1), min(sc.keys, rng.randint(1, 4)))):
            carts.append((session_token(s), pid, rng.randint(1, 3)))
    return products, reviews, carts


async def prepare(url: str | None, sc: Scenario) -> Target:
    """Create and seed the shop's tables under a fresh prefix; fails with a clear message."""
    kind, location = parse_database_url(url)
    prefix = f"surge_{uuid.uuid4().hex[:10]}_"
    products, reviews, carts = _seed_rows(sc)
    if kind == "sqlite":
        tmp = ""
        if not location:
            tmp = tempfile.mkdtemp(prefix="cachelayer-surge-")
            location = os.path.join(tmp, "shop.db")
        target = Target(kind, location, prefix, tmp)
        try:
            conn = sqlite3.connect(location)
        except sqlite3.Error as exc:
            drop_files(target)
            raise SurgeError(f"cannot open SQLite database {location!r}: {exc}") from None
        try:
            with conn:
                conn.executescript(SCHEMA.format(p=prefix))
                for table, rows in zip(TABLES[::-1], (products, reviews, carts), strict=True):
                    marks = ",".join("?" * len(rows[0]))
                    conn.executemany(f"INSERT INTO {prefix}{table} VALUES ({marks})", rows)
            conn.execute("ANALYZE")
        finally:
            conn.close()
        return target
    target = Target(kind, location, prefix)
    conn = await _pg_connect(location)
    try:
        for statement in SCHEMA.format(p=prefix).split(";"):
            await conn.execute(statement)
        for table, rows in zip(TABLES[::-1], (products, reviews, carts), strict=True):
            await conn.copy_records_to_table(prefix + table, records=rows)
        await conn.execute(f"ANALYZE {prefix}products, {prefix}reviews, {prefix}cart_items")
    except BaseException:
        await _pg_drop(conn, prefix)
        raise
    finally:
        await conn.close()
    return target


async def drop(target: Target) -> None:
    """Remove the replay's tables (and the throwaway SQLite file it made)."""
    if target.kind == "postgresql":
        conn = await _pg_connect(target.location)
        try:
            await _pg_drop(conn, target.prefix)
        finally:
            await conn.close()
        return
    if not target.temporary_dir:
        conn = sqlite3.connect(target.location)
        try:
            for table in TABLES:
                conn.execute(f"DROP TABLE IF EXISTS {target.prefix}{table}")
            # ANALYZE made the statistics table; leave it only if something else uses it.
            stats = conn.execute("SELECT name FROM sqlite_master WHERE name = 'sqlite_stat1'")
            if stats.fetchone() and not conn.execute("SELECT 1 FROM sqlite_stat1").fetchone():
                conn.execute("DROP TABLE sqlite_stat1")
            conn.commit()
        finally:
            conn.close()
    drop_files(target)


def drop_files(target: Target) -> None:
    if target.temporary_dir:
        for name in os.listdir(target.temporary_dir):
            os.unlink(os.path.join(target.temporary_dir, name))
        os.rmdir(target.temporary_dir)


async def _pg_drop(conn: Any, prefix: str) -> None:
    await conn.execute("DROP TABLE IF EXISTS " + ", ".join(prefix + t for t in TABLES))


async def _pg_connect(url: str) -> Any:
    import asyncpg  # type: ignore[import-untyped]  # ships no type information

    try:
        return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, ValueError) as exc:
        raise SurgeError(
            f"cannot connect to PostgreSQL at {redact(url)}: {type(exc).__name__}: {exc}"
        ) from None


class Shop:
    """The app's view of the database: three reads over a bounded, measured pool."""

    def __init__(self, target: Target, pool: Pool[Any], close: Any) -> None:
        self.target = target
        self.pool = pool
        self._close = close
        p = target.prefix
        sql = [q.format(p=p) for q in (PRODUCT_SQL, CATEGORY_SQL, CART_SQL)]
        if target.kind == "sqlite":  # SQLite numbers its parameters ?1, PostgreSQL $1
            sql = [re.sub(r"\$(\d+)", r"?\1", q) for q in sql]
        self._product_sql, self._category_sql, self._cart_sql = sql

    async def product(self, product_id: int) -> dict[str, Any] | None:
        rows = await self.pool.fetch(self._product_sql, product_id)
        if not rows:
            return None
        pid, name, price, stock, reviews, rating, rank = rows[0]
        return {
            "id": pid,
            "name": name,
            "price_cents": price,
            "stock": stock,
            "reviews": reviews,
            "rating": round(float(rating), 3),
            "rank_in_category": rank,
        }

    async def category(self, category_id: int) -> dict[str, Any]:
        rows = await self.pool.fetch(self._category_sql, category_id)
        top = [
            {"id": r[0], "name": r[1], "price_cents": r[2], "rating": round(float(r[3]), 3)}
            for r in rows
        ]
        return {"id": category_id, "top": top}

    async def cart(self, session: str) -> dict[str, Any]:
        rows = await self.pool.fetch(self._cart_sql, session)
        items = [{"product_id": r[0], "name": r[1], "qty": r[2]} for r in rows]
        return {"items": items, "total_cents": sum(int(r[3]) for r in rows)}

    async def close(self) -> None:
        await self._close(await self.pool.drain())


async def connect(target: Target, sc: Scenario) -> Shop:
    """Open ``sc.pool_size`` connections to the prepared tables."""
    if target.kind == "sqlite":
        return _connect_sqlite(target, sc)
    return await _connect_pg(target, sc)


def _connect_sqlite(target: Target, sc: Scenario) -> Shop:
    executor = ThreadPoolExecutor(sc.pool_size, thread_name_prefix="surge-sqlite")
    conns = [sqlite3.connect(target.location, check_same_thread=False) for _ in range(sc.pool_size)]

    async def run(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> Rows:
        # The pool lends a connection to one query at a time, so a connection is never used
        # by two threads at once; sqlite3 releases the GIL while SQLite works.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, _sqlite_fetch, conn, sql, args)

    async def close(taken: list[sqlite3.Connection]) -> None:
        for conn in conns:
            conn.close()
        executor.shutdown(wait=True)

    pool = Pool(conns, run, timeout=sc.pool_timeout, delay=sc.db_delay, seed=sc.seed)
    return Shop(target, pool, close)


async def _connect_pg(target: Target, sc: Scenario) -> Shop:
    conns: list[Any] = []
    try:
        for _ in range(sc.pool_size):
            conns.append(await _pg_connect(target.location))
    except BaseException:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        raise

    async def run(conn: Any, sql: str, args: tuple[Any, ...]) -> Rows:
        return [tuple(r) for r in await conn.fetch(sql, *args)]

    async def close(taken: list[Any]) -> None:
        await asyncio.gather(*(c.close(timeout=5) for c in conns), return_exceptions=True)

    pool: Pool[Any] = Pool(conns, run, timeout=sc.pool_timeout, delay=sc.db_delay, seed=sc.seed)
    return Shop(target, pool, close)


def _sqlite_fetch(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> Rows:
    return conn.execute(sql, args).fetchall()
