"""The caller's side of a read-through: what to serve now, what to wait for, what to refresh.

A caller that misses the hot path lands here. In order:

1. An L1 entry that is still fresh is served; if it is inside its early-refresh window and
   XFetch says so, one background refresh is started.
2. A stale L1 entry is served at once when the key is in fail-safe (its loader failed
   recently), when the origin is under pressure (load-aware grace), or within ``stale_ttl``
   (stale-while-revalidate, which also starts one background refresh).
3. Otherwise the caller joins the key's flight (``_flight``), whose leader runs
   ``_flow.lead``, and waits, with a soft timeout (stale if any) and a hard one.

The sync and async twins below differ only in how they wait and where background work runs
(a daemon thread, a task on the running loop); every decision is in the shared helpers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ._codec import Entry, decode_value
from ._flight import CANCELLED, ERROR, OK, Flight, Flights, Outcome
from ._flow import Result, drive_async, drive_sync, lead
from ._redis import FAILED
from .exceptions import LoadTimeoutError

if TYPE_CHECKING:
    from ._options import Options

log = logging.getLogger("cachelayer")

_STALE_COUNTERS = {
    "swr": "stale_swr",
    "fail_safe": "stale_fail_safe",
    "overload": "stale_overload",
    "soft_timeout": "stale_soft_timeout",
    "lease_timeout": "stale_lease_timeout",
}

# How many times in a row a caller joins a new flight after one ended with nothing to share
# (CANCELLED) before it loads on its own: such an ending is someone else's cancellation or
# interruption, so trying again is right, but a caller must never spin on them.
_RETRIES = 3
_INTERRUPTS = (KeyboardInterrupt, SystemExit)


def _ending_sync(exc: BaseException, inline: bool) -> Outcome:
    """What the callers of a sync flight see of its end by ``exc``. In the caller's own thread
    a ``BaseException`` may be that caller's interruption (``KeyboardInterrupt``, gevent's
    ``Timeout``): it is raised to that caller alone, the others load again. In a thread of
    the load's own nothing interrupts it: whatever ends it is the loader's, shared."""
    if inline and not isinstance(exc, Exception):
        return CANCELLED, None
    return ERROR, exc


def _ending_async(exc: BaseException) -> Outcome:
    """What the callers of an async flight see of its end by ``exc``: nothing (they load
    again) if the flight's task was cancelled (abandoned by its last waiter, its loop shutting
    down) or the loop is being stopped; otherwise the loader's own ending, ``CancelledError``
    and other ``BaseException``s included, shared as any error is."""
    if isinstance(exc, Exception):
        return ERROR, exc
    if isinstance(exc, _INTERRUPTS) or _task_cancelled(exc):
        return CANCELLED, None
    return ERROR, exc


if sys.version_info >= (3, 11):

    def _task_cancelled(exc: BaseException) -> bool:
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

else:  # pragma: no cover - no Task.cancelling(): take a CancelledError for one (callers
    # retry, at most _RETRIES times)

    def _task_cancelled(exc: BaseException) -> bool:
        return isinstance(exc, asyncio.CancelledError)


class ReadPath:
    """Mixed into ``Cache``; uses its attributes (``_l1``, ``_flights``, ``_guard``, ...)."""

    if TYPE_CHECKING:
        from ._bus import Bus
        from ._guard import OriginGuard
        from ._l1 import L1
        from ._redis import AsyncTier, SyncTier
        from ._stats import Stats

        _l1: L1
        _flights: Flights
        _guard: OriginGuard
        _stats: Stats
        _bus: Bus
        _clock: Callable[[], float]
        _beta: float
        _max_stale: float
        _throttle_seconds: float
        _copy: bool
        _has_l2: bool
        _rng: Any

        def _warn_once(self, event: str, key: str, what: str, detail: object) -> None: ...
        def _release_later(self, key: str, token: str) -> None: ...

        _sync_tier: SyncTier | None
        _async_tier: AsyncTier | None

    _throttle: dict[str, float]
    _background: set[asyncio.Task[Any]]

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` beside its caller, tracked, so that ``aclose`` can wait for it: a
        load or a lease release still running after the cache closed would reopen a client
        that nothing closes."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- decisions (no I/O, shared) -----------------------------------------------------

    def _value(self, entry: Entry) -> Any:
        if self._copy and entry.payload is not None:
            return decode_value(entry.payload)
        return entry.value

    def _swr_allows(self, entry: Entry, now: float, opts: Options) -> bool:
        return now - entry.fresh_until < opts.stale_ttl and now < entry.stale_until

    def _duress_allows(self, entry: Entry, now: float) -> bool:
        """May this stale entry be served because the origin is failing or saturated?"""
        return now < entry.stale_until and now - entry.fresh_until < self._max_stale

    def _throttled(self, key: str, now: float) -> bool:
        until = self._throttle.get(key)
        if until is None:
            return False
        if now < until:
            return True
        self._throttle.pop(key, None)
        return False

    def _engage_fail_safe(self, key: str, exc: BaseException) -> None:
        now = self._clock()
        if not any(until > now for until in self._throttle.values()):
            # A state change (no key was in fail-safe): one line, not one per key.
            log.warning(
                "cachelayer: fail-safe engaged (first key %r): stale for %.1fs after %s: %s",
                key,
                self._throttle_seconds,
                type(exc).__name__,
                exc,
                extra={"event": "fail_safe_engaged"},
            )
        elif not self._throttled(key, now):
            log.debug("cachelayer: fail-safe also engaged for %r: %r", key, exc)
        if len(self._throttle) > 10_000:
            self._throttle = {k: t for k, t in self._throttle.items() if t > now}
        self._throttle[key] = now + self._throttle_seconds

    def _early(self, entry: Entry, now: float) -> bool:
        """XFetch (Vattani et al., VLDB 2015): refresh a fresh entry early with probability
        that grows as expiry nears, scaled by how long its load took. Paused under pressure."""
        if not entry.l1_fresh <= now < entry.fresh_until or not self._beta:
            return False
        if self._guard.under_pressure:
            return False
        delta = entry.load_time * self._beta
        return now - delta * math.log(1.0 - self._rng.random()) >= entry.fresh_until

    def _serve_l1(
        self, key: str, entry: Entry, now: float, opts: Options
    ) -> tuple[Entry, str | None, bool] | None:
        """``(entry, how, refresh)`` when L1 can answer now, else None."""
        if now < entry.l1_limit:
            entry.visited = True
            self._stats.l1_hits += 1
            return entry, None, self._early(entry, now)
        if now < entry.l1_expires:
            if self._duress_allows(entry, now):
                if self._throttled(key, now):
                    return entry, "fail_safe", False
                if self._guard.under_pressure:
                    return entry, "overload", False
            if self._swr_allows(entry, now, opts):
                return entry, "swr", True
        return None

    def _fallback(self, key: str, flight: Flight) -> Entry | None:
        """A stale entry for a caller whose soft timeout passed."""
        now = self._clock()
        candidates = [flight.stale, self._l1.data.get(key)]
        usable = [e for e in candidates if e is not None and self._duress_allows(e, now)]
        return max(usable, key=lambda e: e.stored_at) if usable else None

    def _settled(self, result: Result, leader: bool) -> tuple[Entry, str | None, bool]:
        """A flight's result for one of its callers: ``(entry, how, refresh early?)``."""
        entry, how = result
        # A waiter handed a stale value was served by fail-safe or grace, not by the load:
        # it is counted there (stale_*), not here, so nothing is counted twice.
        self._stats.coalesced += not leader and how in (None, "fleet")
        return entry, how, how is None and self._early(entry, self._clock())

    def _delivered(self, entry: Entry, how: str | None) -> Any:
        counter = _STALE_COUNTERS.get(how or "")
        if counter is not None:
            setattr(self._stats, counter, getattr(self._stats, counter) + 1)
        return self._value(entry)

    def _timed_out(self, key: str, flight: Flight, opts: Options) -> LoadTimeoutError:
        self._flights.leave(flight, cancelled=False)
        self._stats.load_timeouts += 1
        return LoadTimeoutError(f"load of {key!r} took longer than {opts.hard_timeout}s")

    def _refreshable(self, key: str, entry_tags: tuple[str, ...]) -> Flight | None:
        if self._throttled(key, self._clock()) or key in self._flights:
            return None
        if self._guard.refreshing >= self._guard.refresh_limit:
            return None
        flight = self._flights.start_detached(key)
        if flight is not None:
            self._stats.refreshes += 1
            flight.tags = entry_tags
            flight.since = self._l1.generation
        return flight

    # --- sync -----------------------------------------------------------------------------

    def _run_flight_sync(
        self,
        key: str,
        loader: Callable[[], Any],
        opts: Options,
        flight: Flight,
        refresh_of: Entry | None,
        inline: bool = False,
    ) -> None:
        """Run ``flight``'s load: in the leader's own thread when ``inline``, else in a
        thread of its own (whose end must reach the callers as an outcome, never as an
        exception escaping the thread)."""
        try:
            flow = lead(self, key, opts, flight, refresh_of)  # type: ignore[arg-type]
            result = drive_sync(flow, self, loader)  # type: ignore[arg-type]
        except BaseException as exc:
            outcome = _ending_sync(exc, inline)
            try:
                if flight.lease is not None and self._sync_tier is not None:
                    self._hand_on_sync(key, flight)  # let others take over now
            finally:  # whatever happens, no caller may be left waiting on this flight
                self._flights.finish(key, flight, outcome)
            if outcome[0] == CANCELLED:
                raise  # the leader's caller was interrupted: only it sees why
            if refresh_of is not None:
                self._warn_once("refresh_failed", key, "background refresh failed", repr(exc))
            return
        # A refresh that found nothing to do has no fresh value for callers who queued
        # behind it: they try again (and start, or wait for, a real load).
        self._flights.finish(
            key, flight, (CANCELLED, None) if result[1] == "skipped" else (OK, result)
        )
        if result[1] == "swr":
            self._refresh_sync(key, loader, opts, result[0], early=False)

    def _hand_on_sync(self, key: str, flight: Flight) -> None:
        """Release an aborted flight's lease; if Redis does not take it, the listener tries
        again (``_release_later``) rather than the fleet waiting out the lease's TTL."""
        assert flight.lease is not None and self._sync_tier is not None
        token, fence = flight.lease
        flight.lease = None
        try:
            got = self._sync_tier.fill(key, b"", 0, token, fence, False)
        except Exception:  # strict mode: the load's own ending is what the caller must see
            got = FAILED
        if got is FAILED:
            self._release_later(key, token)

    def _refresh_sync(
        self, key: str, loader: Callable[[], Any], opts: Options, entry: Entry, *, early: bool
    ) -> None:
        flight = self._refreshable(key, opts.tags)
        if flight is not None:
            self._stats.early_refreshes += early
            args = (key, loader, opts, flight, entry)
            threading.Thread(target=self._run_flight_sync, args=args, daemon=True).start()

    def _load_sync(self, key: str, loader: Callable[[], Any], opts: Options) -> Any:
        retries = 0
        while True:
            now = self._clock()
            entry = self._l1.data.get(key)
            if entry is not None:
                served = self._serve_l1(key, entry, now, opts)
                if served is not None:
                    entry, how, refresh = served
                    if refresh:
                        self._refresh_sync(key, loader, opts, entry, early=how is None)
                    return self._delivered(entry, how)
            self._stats.misses += 1
            flight, leader = self._flights.join(key)
            if leader:
                flight.tags = opts.tags
                flight.since = self._l1.generation
                if opts.soft_timeout is None and opts.hard_timeout is None:
                    self._run_flight_sync(key, loader, opts, flight, None, inline=True)
                else:  # the caller must be free to stop waiting
                    args = (key, loader, opts, flight, None)
                    threading.Thread(target=self._run_flight_sync, args=args, daemon=True).start()
            kind, result = self._await_sync(key, flight, opts)
            if kind == OK:
                entry, how, early = self._settled(result, leader)
                if early:
                    self._refresh_sync(key, loader, opts, entry, early=True)
                return self._delivered(entry, how)
            if kind == ERROR:
                raise result
            retries += 1
            if result == "same-loop" or retries > _RETRIES:
                # Cannot wait on our own loop, or flights keep ending with nothing to
                # share: load independently.
                return loader()
            # CANCELLED elsewhere: nothing to share, try again

    def _await_sync(self, key: str, flight: Flight, opts: Options) -> Outcome:
        soft, hard = opts.soft_timeout, opts.hard_timeout
        outcome = self._flights.wait_sync(flight, soft if soft is not None else hard)
        if outcome is None and soft is not None:
            stale = self._fallback(key, flight)
            if stale is not None:
                self._flights.leave(flight, cancelled=False)
                return OK, (stale, "soft_timeout")
            outcome = self._flights.wait_sync(
                flight, None if hard is None else max(0.0, hard - soft)
            )
        if outcome is None:
            raise self._timed_out(key, flight, opts)
        return outcome

    # --- async ----------------------------------------------------------------------------

    async def _run_flight_async(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        opts: Options,
        flight: Flight,
        refresh_of: Entry | None,
    ) -> None:
        try:
            flow = lead(self, key, opts, flight, refresh_of)  # type: ignore[arg-type]
            result: Result = await drive_async(flow, self, loader)  # type: ignore[arg-type]
        except BaseException as exc:
            outcome = _ending_async(exc)  # before the hand-on, which may be cancelled too
            try:
                if flight.lease is not None and self._async_tier is not None:
                    # Cancelled or failed mid-load: hand the lease on rather than make the
                    # fleet wait it out.
                    await self._hand_on_async(key, flight)
            finally:
                self._flights.finish(key, flight, outcome)
            if outcome[0] == CANCELLED and isinstance(exc, (asyncio.CancelledError, *_INTERRUPTS)):
                raise  # the task ends cancelled; the loop stops on an interrupt
            # Anything else went to the callers in the outcome: raised here as well, it
            # would only be logged as a task exception never retrieved.
            if outcome[0] == ERROR and refresh_of is not None:
                self._warn_once("refresh_failed", key, "background refresh failed", repr(exc))
            return
        # A refresh that found nothing to do has no fresh value for callers who queued
        # behind it: they try again (and start, or wait for, a real load).
        self._flights.finish(
            key, flight, (CANCELLED, None) if result[1] == "skipped" else (OK, result)
        )
        if result[1] == "swr":
            self._refresh_async(key, loader, opts, result[0], early=False)

    async def _hand_on_async(self, key: str, flight: Flight) -> None:
        """As ``_hand_on_sync``; waits at most a second for Redis (the task may be
        cancelled again meanwhile, or Redis be slow): then the listener retries."""
        assert flight.lease is not None and self._async_tier is not None
        token, fence = flight.lease
        flight.lease = None
        release = self._spawn(self._async_tier.fill(key, b"", 0, token, fence, False))
        try:
            got = await asyncio.wait_for(asyncio.shield(release), 1.0)
        except BaseException:  # strict mode's BackendError, a timeout, cancelled again
            release.add_done_callback(_consume)
            got = FAILED
        if got is FAILED:
            self._release_later(key, token)

    def _refresh_async(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        opts: Options,
        entry: Entry,
        *,
        early: bool,
    ) -> None:
        flight = self._refreshable(key, opts.tags)
        if flight is not None:
            self._stats.early_refreshes += early
            flight.loop = asyncio.get_running_loop()
            flight.task = self._spawn(self._run_flight_async(key, loader, opts, flight, entry))

    async def _load_async(
        self, key: str, loader: Callable[[], Awaitable[Any]], opts: Options
    ) -> Any:
        retries = 0
        while True:
            now = self._clock()
            entry = self._l1.data.get(key)
            if entry is not None:
                served = self._serve_l1(key, entry, now, opts)
                if served is not None:
                    entry, how, refresh = served
                    if refresh:
                        self._refresh_async(key, loader, opts, entry, early=how is None)
                    return self._delivered(entry, how)
            self._stats.misses += 1
            flight, leader = self._flights.join(key)
            if leader:
                flight.tags = opts.tags
                flight.since = self._l1.generation
                flight.loop = asyncio.get_running_loop()
                flight.task = self._spawn(self._run_flight_async(key, loader, opts, flight, None))
            kind, result = await self._await_async(key, flight, opts)
            if kind == OK:
                entry, how, early = self._settled(result, leader)
                if early:
                    self._refresh_async(key, loader, opts, entry, early=True)
                return self._delivered(entry, how)
            if kind == ERROR:
                raise result
            assert kind == CANCELLED  # cancelled elsewhere: nothing to share, try again
            retries += 1
            if retries > _RETRIES:  # flights keep ending with nothing to share
                return await loader()

    async def _await_async(self, key: str, flight: Flight, opts: Options) -> Outcome:
        soft, hard = opts.soft_timeout, opts.hard_timeout
        outcome = await self._flights.wait_async(flight, soft if soft is not None else hard)
        if outcome is None and soft is not None:
            stale = self._fallback(key, flight)
            if stale is not None:
                self._flights.leave(flight, cancelled=False)
                return OK, (stale, "soft_timeout")
            rest = None if hard is None else max(0.0, hard - soft)
            outcome = await self._flights.wait_async(flight, rest)
        if outcome is None:
            raise self._timed_out(key, flight, opts)
        return outcome


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a release nobody waits for any more (it is retried anyway),
    so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
