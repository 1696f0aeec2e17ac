"""Invalidation: keys, expiry and tags, applied here at once and everywhere else by pub/sub.

One call (or one batch) becomes one ``Change``: fenced deletes/writes/expiries of keys and
version bumps of tags, followed by one message on the namespace's channel, all in a single
pipeline (one round trip). This process applies the change to its own L1 first, without
waiting for the echo; other processes apply it when the message arrives, and ignore their
own messages coming back.

If Redis cannot take the change, it is not dropped: L1 here is already invalidated, the
failure is counted and logged (raised in strict mode), and the change waits in a bounded,
de-duplicated queue that is sent with the next change or when the subscription comes back.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack

from ._options import check_key, check_tags
from ._redis import FAILED, Change

if TYPE_CHECKING:
    from ._cache import Cache

log = logging.getLogger("cachelayer")

INVALIDATE = "inv"
MAX_PENDING = 10_000  # invalidations kept for retry while Redis is away (keys + tags)

_batch: contextvars.ContextVar[Batch | None] = contextvars.ContextVar(
    "cachelayer_batch", default=None
)


class Invalidation(NamedTuple):
    """What ``on_invalidate`` callbacks receive, for every invalidation seen by this process."""

    keys: tuple[str, ...]  # deleted or overwritten
    expired: tuple[str, ...]  # marked stale
    tags: tuple[str, ...]  # whose entries stopped being served
    local: bool  # made by this process (True) or heard from another (False)
    sender: str  # the process that made it


class Batch:
    """Collects invalidations; sends them in one round trip when the block exits cleanly.

    Works with ``with`` and ``async with``. If the block raises, nothing is invalidated, not
    even locally, so invalidations can follow a database commit that may fail.
    """

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.keys: dict[str, None] = {}
        self.expired: dict[str, None] = {}
        self.tags: dict[str, None] = {}
        self._token: contextvars.Token[Batch | None] | None = None
        self._outer: Batch | None = None

    def add(self, keys: Iterable[str], expired: Iterable[str], tags: Iterable[str]) -> None:
        self.keys.update(dict.fromkeys(keys))
        self.expired.update(dict.fromkeys(expired))
        self.tags.update(dict.fromkeys(tags))

    def _enter(self) -> Batch:
        self._outer = _batch.get()
        self._token = _batch.set(self)
        return self

    def _exit(self, failed: bool) -> tuple[list[str], list[str], list[str]] | None:
        assert self._token is not None
        _batch.reset(self._token)
        if failed:
            return None
        parts = (list(self.keys), list(self.expired), list(self.tags))
        if self._outer is not None:  # nested: the outer batch sends it
            self._outer.add(*parts)
            return None
        return parts

    def __enter__(self) -> Batch:
        return self._enter()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        parts = self._exit(et is not None)
        if parts is not None:
            self.cache._invalidate_sync(*parts, batched=False)

    async def __aenter__(self) -> Batch:
        return self._enter()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        parts = self._exit(et is not None)
        if parts is not None:
            await self.cache._invalidate_async(*parts, batched=False)


class Invalidator:
    """Mixed into ``Cache``: the local half of invalidation and the change to send."""

    if TYPE_CHECKING:
        from ._bus import Bus
        from ._flight import Flights
        from ._l1 import L1
        from ._stats import Stats
        from ._tags import TagVersions

        _l1: L1
        _flights: Flights
        _bus: Bus
        _stats: Stats
        _tag_versions: TagVersions
        _throttle: dict[str, float]
        _clock: Callable[[], float]
        _has_l2: bool
        _health: Any

        def _flush_pending(self) -> None: ...
        def _release_leases(self) -> None: ...

    _callbacks: list[Callable[[Invalidation], Any]]
    _pending: dict[tuple[str, str], None]
    _pending_lock: threading.Lock
    _queue_warned: bool

    def on_invalidate(
        self, callback: Callable[[Invalidation], Any]
    ) -> Callable[[Invalidation], Any]:
        """Call ``callback(Invalidation)`` for every invalidation this process makes or hears
        of (usable as a decorator). Remote ones arrive on the listener thread."""
        self._callbacks.append(callback)
        return callback

    def _apply_local(
        self,
        keys: list[str],
        expired: list[str],
        tags: list[str],
        at: float,
        sender: str,
        local: bool,
    ) -> None:
        for key in keys:
            self._l1.discard(key)
        for key in expired:
            self._l1.expire(key, at)
        for key in (*keys, *expired):
            self._flights.invalidate(key)  # a load already running must not refill L1
            self._throttle.pop(key, None)
        if tags:
            self._tag_versions.forget(tags)  # before dropping, so no refill can race in
            self._flights.invalidate_tags(tags)
            self._l1.drop_tags(tags)
        event = Invalidation(tuple(keys), tuple(expired), tuple(tags), local, sender)
        for callback in self._callbacks:
            try:
                callback(event)
            except Exception:
                log.exception("cachelayer: on_invalidate callback %r failed", callback)

    def _on_message(self, kind: str, sender: str, payload: Any) -> None:
        """Bus handler: apply other processes' invalidations; track the subscription."""
        if kind == INVALIDATE and sender != self._bus.sender:
            try:
                keys, expired, tags, at = payload
                self._stats.invalidations_received += 1
                self._apply_local(list(keys), list(expired), list(tags), float(at), sender, False)
            except (TypeError, ValueError) as exc:
                log.debug("cachelayer: ignoring a malformed invalidation: %r", exc)
        elif kind == "subscribed":
            self._tag_versions.clear(listening=True)  # what we knew may have moved meanwhile
            self._health.ok()  # the listener just talked to Redis: no need to wait the cool-down
            self._l1.trust()
            log.info(
                "cachelayer: subscribed to %s; L1 in use",
                self._bus.channel,
                extra={"event": "subscribed"},
            )
            # Redis is back: other processes may be waiting on leases this one could not
            # release meanwhile, so hand them on now rather than at the next tick.
            self._flush_pending()
            self._release_leases()
        elif kind == "tick":  # retry what Redis missed, once a second
            if self._pending:
                self._flush_pending()
            self._release_leases()
        elif kind == "unsubscribed":
            self._l1.distrust()
            self._tag_versions.clear(listening=False)
            self._stats.subscription_losses += 1
            log.warning(
                "cachelayer: not subscribed to invalidations; L1 cleared, and kept at most "
                "%.1fs per entry until subscribed again",
                self._l1.degraded_ttl,
                extra={"event": "subscription_lost"},
            )

    def _change(
        self,
        keys: list[str],
        expired: list[str],
        tags: list[str],
        written: list[tuple[str, bytes, int]],
    ) -> Change:
        """The change to send, with whatever earlier changes are still pending."""
        change = Change(self._clock())
        change.written = written
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        change.deleted = list(dict.fromkeys([*(k for kind, k in pending if kind == "d"), *keys]))
        change.expired = list(dict.fromkeys([*(k for kind, k in pending if kind == "x"), *expired]))
        change.tags = list(dict.fromkeys([*(k for kind, k in pending if kind == "t"), *tags]))
        everyone = [k for k, _, _ in written] + change.deleted
        payload = [everyone, change.expired, change.tags, change.now]
        change.message = msgpack.packb([INVALIDATE, self._bus.sender, payload], use_bin_type=True)
        return change

    def _sent(self, change: Change, result: Any) -> None:
        if result is not FAILED:
            self._stats.invalidations_sent += 1
            if self._queue_warned and not self._pending:
                self._queue_warned = False
                log.info(
                    "cachelayer: queued invalidations sent; queue empty",
                    extra={"event": "invalidations_drained"},
                )
            return
        # A write Redis may not have taken is retried as a delete: other processes then drop
        # their copy and reload, which is right whichever value Redis ended up with.
        overwritten = [k for k, _, _ in change.written]
        with self._pending_lock:
            for kind, items in (
                ("d", [*change.deleted, *overwritten]),
                ("x", change.expired),
                ("t", change.tags),
            ):
                for item in items:
                    self._pending[(kind, item)] = None
            while len(self._pending) > MAX_PENDING:
                dropped = next(iter(self._pending))
                del self._pending[dropped]
                log.error("cachelayer: invalidation queue full; dropped %r", dropped)
            queued = len(self._pending)
        # Once per episode: the listener retries every second while Redis stays away.
        level = logging.DEBUG if self._queue_warned else logging.WARNING
        self._queue_warned = True
        log.log(
            level,
            "cachelayer: redis did not take an invalidation; applied locally, %d queued for retry",
            queued,
            extra={"event": "invalidations_queued"},
        )

    @staticmethod
    def _parts(
        keys: Iterable[str], expired: Iterable[str], tags: Iterable[str]
    ) -> tuple[list[str], list[str], list[str]]:
        return (
            [check_key(k) for k in keys],
            [check_key(k) for k in expired],
            list(check_tags(tuple(tags))),
        )

    def _batched(self, keys: list[str], expired: list[str], tags: list[str]) -> bool:
        batch = _batch.get()
        if batch is None:
            return False
        batch.add(keys, expired, tags)
        return True
