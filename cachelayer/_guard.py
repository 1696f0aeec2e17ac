"""The origin guard: a cap on concurrent loader calls, shared by threads and event loops.

The incident behind cachelayer was a connection pool that ran dry: every request that missed
the cache queued for a connection, and the queue, not the database, took the site down. The
guard is set below the pool size. A load that cannot get a slot within ``wait`` seconds does
not queue forever: it is served stale if possible, otherwise fails fast with
``OriginOverloadedError``. Background refreshes take slots only while more than ``reserve``
are free, so they never take the last ones from callers who are waiting, and at most
``refresh_limit`` of them run at once.

It also keeps an error rate of recent loads; ``under_pressure`` (saturated, or mostly
failing) is the signal for load-aware grace: prefer stale data, pause early refreshes.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable

from .exceptions import ConfigurationError

_DEFAULT_REFRESHES = 8
_Waiter = threading.Event | tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]
_ERROR_WEIGHT = 0.1  # EWMA weight of each load outcome: about the last 10-20 loads count


class OriginGuard:
    def __init__(
        self,
        limit: int | None,
        wait: float,
        refresh_limit: int | None,
        on_wait: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ConfigurationError(f"origin_limit must be a positive int or None, got {limit!r}")
        self.limit = limit
        self.wait = wait
        self.reserve = 0 if limit is None else max(1, limit // 5)
        if refresh_limit is None:
            # Even with no cap on loads, refreshes nobody waits for are capped: a thousand
            # keys going stale together must not become a thousand queries at once.
            refresh_limit = _DEFAULT_REFRESHES if limit is None else max(1, limit - self.reserve)
        self.refresh_limit = refresh_limit
        self.in_use = 0
        self.refreshing = 0
        self.waiting = 0
        self.waited_seconds = 0.0
        self.shed = 0
        self.error_rate = 0.0
        self.on_wait = on_wait
        self._lock = threading.Lock()
        self._queue: collections.deque[_Waiter] = collections.deque()

    @property
    def under_pressure(self) -> bool:
        saturated = self.limit is not None and (self.in_use >= self.limit or self.waiting > 0)
        return saturated or self.error_rate > 0.5

    def record(self, failed: bool) -> None:
        self.error_rate += _ERROR_WEIGHT * ((1.0 if failed else 0.0) - self.error_rate)

    def try_acquire(self, background: bool = False) -> bool:
        with self._lock:
            if background:
                if self.refreshing >= self.refresh_limit:
                    return False
                if self.limit is not None and self.limit - self.in_use <= self.reserve:
                    return False
                self.refreshing += 1
            elif self.limit is not None and (self.in_use >= self.limit or self._queue):
                return False
            self.in_use += 1
            return True

    def release(self, background: bool = False) -> None:
        with self._lock:
            if background:
                self.refreshing -= 1
            # Hand the slot straight to the first waiter, so a newcomer cannot overtake it.
            while self._queue:
                waiter = self._queue.popleft()
                if isinstance(waiter, threading.Event):
                    waiter.set()
                    return
                loop, fut = waiter
                try:
                    loop.call_soon_threadsafe(_grant, fut, self)
                except RuntimeError:  # its loop is gone; try the next waiter
                    continue
                return
            self.in_use -= 1

    def acquire_sync(self) -> bool:
        if self.try_acquire():
            return True
        event = threading.Event()
        with self._lock:
            if self.limit is None or (self.in_use < self.limit and not self._queue):
                self.in_use += 1
                return True
            self._queue.append(event)
            self.waiting += 1
        started = time.monotonic()
        granted = event.wait(self.wait)
        waited = time.monotonic() - started
        self.on_wait(waited)
        with self._lock:
            self.waiting -= 1
            self.waited_seconds += waited
            if not granted:
                try:
                    self._queue.remove(event)
                except ValueError:  # granted just as the wait ended
                    granted = True
            if not granted:
                self.shed += 1
        return granted

    async def acquire_async(self) -> bool:
        if self.try_acquire():
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (loop, fut)
        with self._lock:
            if self.limit is None or (self.in_use < self.limit and not self._queue):
                self.in_use += 1
                return True
            self._queue.append(entry)
            self.waiting += 1
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.wait)
            granted = True
        except asyncio.TimeoutError:
            granted = False
        except asyncio.CancelledError:
            if not self._abandon(entry):
                # Granted, or about to be (_grant runs on this loop): give the slot back.
                if fut.done():
                    self.release()
                else:
                    fut.cancel()
            raise
        finally:
            waited = time.monotonic() - started
            self.on_wait(waited)
            with self._lock:
                self.waiting -= 1
                self.waited_seconds += waited
        if not granted:
            granted = not self._abandon(entry)  # a grant racing the timeout still counts
            if not granted:
                with self._lock:
                    self.shed += 1
        return granted

    def _abandon(self, entry: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]) -> bool:
        """Leave the queue: True if we left it before a slot was handed to us."""
        with self._lock:
            try:
                self._queue.remove(entry)
            except ValueError:
                return False
            return True

    def snapshot(self) -> dict[str, float | int | None]:
        return {
            "origin_limit": self.limit,
            "loads_in_flight": self.in_use,
            "origin_waiting": self.waiting,
            "origin_wait_seconds": self.waited_seconds,
            "origin_refused": self.shed,  # every refused slot, served stale or raised
            "refreshes_in_flight": self.refreshing,
            "load_error_rate": round(self.error_rate, 4),
        }


def _grant(fut: asyncio.Future[None], guard: OriginGuard) -> None:
    if fut.done():  # the waiter gave up after the slot was handed over: pass it on
        guard.release()
    else:
        fut.set_result(None)
