"""The fleet's message bus: one Redis pub/sub subscription per cache, on one channel.

A lease holder that fills a key other processes are waiting for publishes ``fill`` (only when
someone waits, which the lease script records), so waiters wake the moment the value lands
instead of polling. One listener thread serves sync and async waiters alike: async waiters
are woken with ``call_soon_threadsafe``. While the subscription is down, waiters fall back
to short polls; ``ready`` says which regime is in force.

Messages are msgpack arrays ``[kind, sender, payload]``; anything else on the channel is
ignored (logged at debug), so a stray PUBLISH cannot break a process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

log = logging.getLogger("cachelayer")

FILL = "fill"
PROBE = "probe"  # a listener's test of its own subscription (Cluster); others ignore it
_PROBE_WAIT = 1.0  # seconds to hear them all before subscribing again
_RECONNECT_MAX = 2.0  # seconds between resubscription attempts, at most

Handler = Callable[[str, str, Any], None]


class Bus:
    def __init__(self, client_factory: Callable[[], Any], channel: str, enabled: bool) -> None:
        self.enabled = enabled  # a cache without Redis has nothing to listen to
        self.channel = channel
        self.sender = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.ready = threading.Event()
        self.handlers: list[Handler] = []
        self._client_factory = client_factory
        self._waiters: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pubsub: Any = None
        self._complained = False

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None and self.enabled:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name=f"cachelayer-bus:{self.channel}", daemon=True
                    )
                    self._thread.start()

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=3)

    def _run(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            try:
                client, probe = self._client_factory()
                self._pubsub = client.pubsub(ignore_subscribe_messages=False)
                self._pubsub.subscribe(self.channel)
                next_tick = time.monotonic() + 1.0
                while not self._stop.is_set():
                    # Short, so close() is prompt; an idle wake-up costs microseconds.
                    message = self._pubsub.get_message(timeout=0.1)
                    if time.monotonic() >= next_tick:  # housekeeping: retry queued work
                        next_tick = time.monotonic() + 1.0
                        self._emit("tick", "", None)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        if probe is not None:
                            self._hear_probes(probe)
                        delay = 0.05
                        self._complained = False
                        self._emit("subscribed", "", None)  # handlers first: then "ready"
                        self.ready.set()
                    elif message["type"] == "message":
                        self._dispatch(message["data"])
            except Exception as exc:  # redis-py raises more than RedisError when a socket dies
                if self.ready.is_set():  # the cache's handler logs the state change
                    log.debug("cachelayer: lost the subscription to %s: %r", self.channel, exc)
                    self.ready.clear()
                    self._emit("unsubscribed", "", None)
                elif not self._complained:  # never subscribed: say so once, and why
                    self._complained = True
                    log.warning(
                        "cachelayer: cannot subscribe to %s (%s: %s); invalidations from other "
                        "processes cannot reach this one until it can",
                        self.channel,
                        type(exc).__name__,
                        exc,
                        extra={"event": "subscription_failed"},
                    )
                self._stop.wait(delay)
                delay = min(delay * 2, _RECONNECT_MAX)
            finally:
                pubsub, self._pubsub = self._pubsub, None
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
        self.ready.clear()

    def _hear_probes(self, probe: Callable[[tuple[str, bytes]], int]) -> None:
        """Publish a probe from every other node and wait to hear each (see
        ``Clients.subscriber``); raise, so the loop subscribes again, if they do not come."""
        nonce = secrets.token_hex(8)
        expected = probe((self.channel, self.encode(PROBE, nonce)))
        deadline = time.monotonic() + _PROBE_WAIT
        while expected > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionError(f"{expected} probes from other nodes never arrived")
            message = self._pubsub.get_message(timeout=min(left, 0.1))
            if message is None or message["type"] != "message":
                continue
            if self._is_probe(message["data"], nonce):
                expected -= 1
            else:
                self._dispatch(message["data"])

    def _is_probe(self, data: Any, nonce: str) -> bool:
        try:
            kind, sender, payload = msgpack.unpackb(data, raw=False)
        except Exception:
            return False
        return bool(kind == PROBE and sender == self.sender and payload == nonce)

    # --- messages -----------------------------------------------------------------------

    def encode(self, kind: str, payload: Any) -> bytes:
        return msgpack.packb([kind, self.sender, payload], use_bin_type=True)  # type: ignore[no-any-return]

    def _dispatch(self, data: Any) -> None:
        try:
            kind, sender, payload = msgpack.unpackb(data, raw=False)
            if not isinstance(kind, str) or not isinstance(sender, str):
                raise ValueError("malformed header")
        except Exception as exc:  # a stray publish on our channel: not ours to die of
            log.debug("cachelayer: ignoring a foreign message on %s: %r", self.channel, exc)
            return
        if kind == FILL and isinstance(payload, str):
            self.wake(payload)
        self._emit(kind, sender, payload)

    def _emit(self, kind: str, sender: str, payload: Any) -> None:
        for handler in self.handlers:
            try:
                handler(kind, sender, payload)
            except Exception:  # pragma: no cover - handlers are ours; log, keep listening
                log.exception("cachelayer: bus handler failed")

    # --- waiters for a key to be filled -------------------------------------------------

    def expect(self, key: str, waiter: Any) -> None:
        """Register a ``threading.Event`` or ``(loop, future)`` to wake when ``key`` fills."""
        with self._lock:
            self._waiters.setdefault(key, []).append(waiter)

    def forget(self, key: str, waiter: Any) -> None:
        with self._lock:
            waiters = self._waiters.get(key)
            if waiters is not None:
                try:
                    waiters.remove(waiter)
                except ValueError:
                    pass
                if not waiters:
                    del self._waiters[key]

    def wake(self, key: str) -> None:
        with self._lock:
            waiters = self._waiters.pop(key, ())
        for waiter in waiters:
            if isinstance(waiter, threading.Event):
                waiter.set()
            else:
                loop, fut = waiter
                try:
                    loop.call_soon_threadsafe(_set, fut)
                except RuntimeError:
                    pass


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
