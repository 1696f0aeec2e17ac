"""A bounded connection pool that measures itself, and the brown-out the replay injects.

Both database backends (SQLite, PostgreSQL) hand their connections to this one pool, so the
figures the replay prints (queries, peak connections in use, time spent waiting for a
connection, pool timeouts) are counted the same way whatever the database.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

C = TypeVar("C")
Rows = list[tuple[Any, ...]]


class PoolTimeoutError(Exception):
    """No connection became free within the pool timeout (the app answers 503)."""


class InjectedFailureError(Exception):
    """A query failed on purpose: the brown-out's share of failing queries."""


class DatabaseError(Exception):
    """The database itself failed a query (not injected)."""


def _outcome_seen(task: asyncio.Future[Any]) -> None:
    # When the caller gave up, nobody awaits the query any more; its failure is already
    # counted, so mark it seen rather than let asyncio log it as never retrieved.
    if not task.cancelled():
        task.exception()


class PoolMetrics:
    """What the pool saw during one run; times are ``time.monotonic()`` seconds."""

    def __init__(self, t0: float | None = None) -> None:
        self.t0 = time.monotonic() if t0 is None else t0
        self.queries = 0  # queries sent to the database (including ones that then failed)
        self.query_seconds = 0.0  # time the database itself took, excluding injected delay
        self.injected_seconds = 0.0  # injected delay, reported separately
        self.injected_failures = 0
        self.database_errors = 0
        self.pool_timeouts = 0
        self.in_use = 0
        self.peak_in_use = 0
        self.waits: list[float] = []  # seconds each acquire waited (timeouts included)
        self.query_times: list[float] = []  # start of each query, seconds since t0

    def snapshot(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "query_seconds": self.query_seconds,
            "injected_seconds": self.injected_seconds,
            "injected_failures": self.injected_failures,
            "database_errors": self.database_errors,
            "pool_timeouts": self.pool_timeouts,
            "peak_in_use": self.peak_in_use,
            "waits": self.waits,
            "query_times": self.query_times,
        }


class Pool(Generic[C]):
    """At most ``len(connections)`` queries at a time; the rest wait, up to ``timeout``.

    ``execute(conn, sql, args)`` runs one query on one connection (a thread for SQLite, the
    asyncpg protocol for PostgreSQL). ``degrade`` switches the brown-out on and off.
    """

    def __init__(
        self,
        connections: list[C],
        execute: Callable[[C, str, tuple[Any, ...]], Awaitable[Rows]],
        *,
        timeout: float,
        delay: float = 0.0,
        seed: int = 0,
    ) -> None:
        self._free = list(connections)
        self._waiters: collections.deque[asyncio.Future[C]] = collections.deque()
        self.size = len(connections)
        self._all_free = asyncio.Event()
        self._all_free.set()
        self._execute = execute
        self._timeout = timeout
        self._delay = delay
        self._rng = random.Random(seed)
        self.slowdown = 1.0
        self.fail_share = 0.0
        self.metrics = PoolMetrics()

    def reset(self, t0: float) -> None:
        """Start counting afresh for a run whose clock starts at monotonic ``t0``."""
        self.metrics = PoolMetrics(t0)
        self.degrade(1.0, 0.0)

    def degrade(self, slowdown: float, fail_share: float) -> None:
        self.slowdown, self.fail_share = slowdown, fail_share

    async def fetch(self, sql: str, *args: Any) -> Rows:
        m = self.metrics
        asked = time.monotonic()
        try:
            conn = await self._acquire()
        except PoolTimeoutError:
            m.pool_timeouts += 1
            raise
        finally:
            m.waits.append(time.monotonic() - asked)
        # The query runs in a task of its own that returns the connection when the query is
        # really over: a caller that gives up (client timeout) must not hand a connection
        # back to the pool while a thread or the server is still using it.
        held = asyncio.ensure_future(self._hold(conn, m, sql, args))
        held.add_done_callback(_outcome_seen)
        return await asyncio.shield(held)

    async def _acquire(self) -> C:
        if self._free and not self._waiters:
            self._all_free.clear()
            return self._free.pop()
        # First come, first served: a released connection is handed to the oldest waiter.
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[C] = loop.create_future()
        self._waiters.append(fut)
        expiry = loop.call_later(self._timeout, self._expire, fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(fut.result())  # handed over just as the caller gave up
            raise
        finally:
            expiry.cancel()

    def _expire(self, fut: asyncio.Future[C]) -> None:
        if not fut.done():
            fut.set_exception(
                PoolTimeoutError(f"no free connection among {self.size} within {self._timeout:g}s")
            )

    def _release(self, conn: C) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self._free.append(conn)
        if len(self._free) == self.size:
            self._all_free.set()

    async def _hold(self, conn: C, m: PoolMetrics, sql: str, args: tuple[Any, ...]) -> Rows:
        m.in_use += 1
        m.peak_in_use = max(m.peak_in_use, m.in_use)
        start = time.monotonic()
        m.queries += 1
        m.query_times.append(start - m.t0)
        try:
            try:
                rows = await self._execute(conn, sql, args)
            except Exception as exc:
                m.database_errors += 1
                raise DatabaseError(f"{type(exc).__name__}: {exc}") from exc
            took = time.monotonic() - start
            m.query_seconds += took
            # A slower server holds the connection longer; modelled, so reported as injected.
            extra = self._delay + (self.slowdown - 1.0) * took
            if extra > 0:
                m.injected_seconds += extra
                await asyncio.sleep(extra)
            if self.fail_share and self._rng.random() < self.fail_share:
                m.injected_failures += 1
                raise InjectedFailureError("query failed (injected brown-out failure)")
            return rows
        finally:
            m.in_use -= 1
            self._release(conn)

    async def drain(self, timeout: float = 30.0) -> list[C]:
        """Wait (bounded) for in-flight queries to hand their connections back; take them all."""
        try:
            await asyncio.wait_for(self._all_free.wait(), timeout)
        except asyncio.TimeoutError:
            pass  # a query stuck beyond the bound: close what came back, report nothing more
        taken, self._free = self._free, []
        return taken
