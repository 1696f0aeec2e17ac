"""In-process single-flight: one load per key, whoever asks and however they wait.

One table serves threads and asyncio tasks alike, across any number of event loops, so a key
is loaded once even when sync callers in threads and async callers on several loops want it
at the same moment. The first caller starts the load (the *leader*); everyone, the leader's
caller included, then waits for the flight's outcome:

* a sync load runs in the leader's thread, or in a worker thread when callers have timeouts
  (a caller cannot stop waiting for work its own thread is doing);
* an async load runs in its own task, so cancelling the caller that happened to start it does
  not cancel the load the others are waiting for. Only when every waiter has been *cancelled*
  is the load abandoned; a caller that merely *timed out* leaves it running, because its
  result is still wanted by the cache.

Waiters block on a ``threading.Event`` (threads) or await a future of their own loop, which
the finishing side resolves thread-safely. A load that ends by cancellation (not by an
exception) has no result to share, so its waiters try again rather than seeing a
``CancelledError`` that is not theirs.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

OK, ERROR, CANCELLED = 1, 2, 3
Outcome = tuple[int, Any]

# Returns None outside a loop instead of raising: a raise costs a sync caller a microsecond.
running_loop = asyncio.events._get_running_loop


def _resolve(fut: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not fut.done():
        fut.set_result(outcome)


class Flight:
    __slots__ = (
        "event",
        "invalidated",
        "lease",
        "listeners",
        "loop",
        "outcome",
        "since",
        "stale",
        "tags",
        "task",
        "waiters",
    )

    def __init__(self) -> None:
        self.outcome: Outcome | None = None
        self.waiters = 0
        self.event: threading.Event | None = None
        self.listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Outcome]]] = []
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.invalidated = False  # an invalidation arrived while loading: keep out of L1
        self.stale: Any = None  # best stale entry the load found, for callers who time out
        self.lease: tuple[str, str] | None = None  # (token, fence) while holding a lease
        self.tags: tuple[str, ...] = ()  # the tags its entry will carry
        self.since = 0  # L1's invalidation generation when the load began


class Flights:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: str) -> bool:
        return key in self._flights

    def join(self, key: str) -> tuple[Flight, bool]:
        """Wait for ``key``'s flight, starting one if there is none: ``(flight, leader)``."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = Flight()
            flight.waiters += 1
            return flight, leader

    def start_detached(self, key: str) -> Flight | None:
        """Start a flight nobody waits for (a background refresh); None if one is running."""
        with self._lock:
            if key in self._flights:
                return None
            flight = self._flights[key] = Flight()
            return flight

    def invalidate(self, key: str) -> None:
        """An invalidation of ``key`` overtook its running load: the load's result may go to
        those already waiting (they asked before), but not into L1, and later callers must
        not join it: they start a new flight."""
        with self._lock:
            flight = self._flights.pop(key, None)
            if flight is not None:
                flight.invalidated = True

    def invalidate_tags(self, tags: list[str] | tuple[str, ...]) -> None:
        """Like ``invalidate``, for every running load whose entry carries one of ``tags``."""
        wanted = set(tags)
        with self._lock:
            hit = [k for k, f in self._flights.items() if wanted.intersection(f.tags)]
            for key in hit:
                self._flights.pop(key).invalidated = True

    def finish(self, key: str, flight: Flight, outcome: Outcome) -> None:
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.outcome = outcome
            listeners, flight.listeners = flight.listeners, []
            event = flight.event
        if event is not None:
            event.set()
        here = running_loop()
        for loop, fut in listeners:
            if loop is here:
                _resolve(fut, outcome)
            else:
                try:
                    loop.call_soon_threadsafe(_resolve, fut, outcome)
                except RuntimeError:  # that loop is closed; its waiter is gone with it
                    pass

    # --- waiting ------------------------------------------------------------------------

    def wait_sync(self, flight: Flight, timeout: float | None) -> Outcome | None:
        """The outcome, or None if ``timeout`` passed first (the caller still counts)."""
        if flight.outcome is not None:
            return flight.outcome
        with self._lock:
            if flight.outcome is not None:
                return flight.outcome
            if flight.event is None:
                flight.event = threading.Event()
            event = flight.event
        if flight.loop is not None and flight.loop is running_loop():
            # A sync call inside the very loop that runs the load would block that load
            # forever.
            return (CANCELLED, "same-loop")
        event.wait(timeout)
        return flight.outcome

    async def wait_async(self, flight: Flight, timeout: float | None) -> Outcome | None:
        """The outcome, or None on timeout. Cancellation of the caller leaves the flight and
        abandons the load if it was the last waiter."""
        if flight.outcome is not None:
            return flight.outcome
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome] = loop.create_future()
        with self._lock:
            if flight.outcome is not None:
                return flight.outcome
            flight.listeners.append((loop, fut))
        try:
            if timeout is None:
                return await fut
            done, _ = await asyncio.wait((fut,), timeout=timeout)
            return fut.result() if done else None
        except asyncio.CancelledError:
            self.leave(flight, cancelled=True)
            raise
        finally:
            if not fut.done():
                with self._lock:
                    try:
                        flight.listeners.remove((loop, fut))
                    except ValueError:
                        pass

    def leave(self, flight: Flight, *, cancelled: bool) -> None:
        """A waiter stops waiting. The load is abandoned only when the last one was
        cancelled: callers that timed out still want the cache filled."""
        with self._lock:
            flight.waiters -= 1
            abandon = cancelled and flight.waiters == 0 and flight.outcome is None
        task, loop = flight.task, flight.loop
        if abandon and task is not None and loop is not None:
            if loop is running_loop():
                task.cancel()
            else:
                loop.call_soon_threadsafe(task.cancel)
