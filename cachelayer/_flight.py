"""In-process single-flight: one load per key, whoever asks and however they wait.

One table serves threads and asyncio tasks alike, across any number of event loops, so a key
is loaded once even when sync callers in threads and async callers on several loops want it
at the same moment. The first caller becomes the leader:

* a sync leader runs the load in its own thread;
* an async leader runs it in a separate task on its loop, so cancelling the caller that
  happened to start it does not cancel the load the others are waiting for. Only when every
  waiter has gone is the load cancelled (abandoned).

Followers block on a ``threading.Event`` (threads) or await a future of their own loop, which
the finishing side resolves thread-safely. A load that ends by cancellation (not by an
exception) has no result to share, so its followers try again rather than seeing a
``CancelledError`` that is not theirs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from ._stats import Stats

T = TypeVar("T")

_OK, _ERROR, _CANCELLED = 1, 2, 3
_Outcome = tuple[int, Any]


# Returns None outside a loop instead of raising: a raise costs a sync caller a microsecond.
_running_loop = asyncio.events._get_running_loop


def _resolve(fut: asyncio.Future[_Outcome], outcome: _Outcome) -> None:
    if not fut.done():
        fut.set_result(outcome)


class _Flight:
    __slots__ = ("event", "listeners", "loop", "outcome", "task", "waiters")

    def __init__(self) -> None:
        self.outcome: _Outcome | None = None
        self.waiters = 0
        self.event: threading.Event | None = None
        self.listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[_Outcome]]] = []
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None


class Flights(Generic[T]):
    def __init__(self, stats: Stats) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._stats = stats

    def in_flight(self) -> int:
        return len(self._flights)

    def _join(self, key: str) -> tuple[_Flight, bool]:
        # Caller holds the lock.
        flight = self._flights.get(key)
        leader = flight is None
        if flight is None:
            flight = self._flights[key] = _Flight()
        flight.waiters += 1
        return flight, leader

    def _finish(self, key: str, flight: _Flight, outcome: _Outcome) -> None:
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.outcome = outcome
            listeners, flight.listeners = flight.listeners, []
            event = flight.event
        if event is not None:
            event.set()
        here = _running_loop()
        for loop, fut in listeners:
            if loop is here:
                _resolve(fut, outcome)
            else:
                try:
                    loop.call_soon_threadsafe(_resolve, fut, outcome)
                except RuntimeError:  # that loop is closed; its waiter is gone with it
                    pass

    def _followed(self, outcome: _Outcome) -> tuple[bool, Any]:
        """Turn a finished flight into (done, result) for a follower, raising its error."""
        kind, result = outcome
        if kind == _OK:
            self._stats.coalesced += 1
            return True, result
        if kind == _ERROR:
            raise result
        return False, None  # cancelled: nothing to share, try again

    def run_sync(self, key: str, lead: Callable[[], T]) -> T:
        while True:
            with self._lock:
                flight, leader = self._join(key)
                if not leader and flight.event is None:
                    flight.event = threading.Event()
                event = flight.event
            if leader:
                try:
                    result = lead()
                except Exception as exc:
                    self._finish(key, flight, (_ERROR, exc))
                    raise
                except BaseException:
                    self._finish(key, flight, (_CANCELLED, None))
                    raise
                self._finish(key, flight, (_OK, result))
                return result
            assert event is not None
            if flight.loop is not None and flight.loop is _running_loop():
                # A sync call inside the very loop that runs the load would block that load
                # forever; load independently instead of deadlocking.
                with self._lock:
                    flight.waiters -= 1
                return lead()
            event.wait()
            assert flight.outcome is not None
            done, value = self._followed(flight.outcome)
            if done:
                return value  # type: ignore[no-any-return]

    async def run_async(self, key: str, lead: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        while True:
            fut: asyncio.Future[_Outcome] = loop.create_future()
            with self._lock:
                flight, leader = self._join(key)
                flight.listeners.append((loop, fut))
                if leader:
                    flight.loop = loop
                    flight.task = loop.create_task(self._lead_async(key, flight, lead))
            try:
                outcome = await fut
            except asyncio.CancelledError:
                self._leave(flight)
                raise
            done, value = self._followed(outcome) if not leader else self._led(outcome)
            if done:
                return value  # type: ignore[no-any-return]

    @staticmethod
    def _led(outcome: _Outcome) -> tuple[bool, Any]:
        kind, result = outcome
        if kind == _ERROR:
            raise result
        return kind == _OK, result

    def _leave(self, flight: _Flight) -> None:
        with self._lock:
            flight.waiters -= 1
            abandon = flight.waiters == 0 and flight.outcome is None
        if abandon and flight.task is not None and flight.loop is not None:
            if flight.loop is _running_loop():
                flight.task.cancel()
            else:
                flight.loop.call_soon_threadsafe(flight.task.cancel)

    async def _lead_async(
        self, key: str, flight: _Flight, lead: Callable[[], Awaitable[T]]
    ) -> None:
        try:
            result = await lead()
        except Exception as exc:
            self._finish(key, flight, (_ERROR, exc))
        except BaseException:
            # Cancelled: abandoned by its last waiter, or the loop is shutting down.
            self._finish(key, flight, (_CANCELLED, None))
            raise
        else:
            self._finish(key, flight, (_OK, result))
