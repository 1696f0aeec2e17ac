"""The Redis tier: clients, and get/set/delete that fail open.

Both drivers share one ``BackendHealth``: it counts failures, logs each change of state once
(not once per request), and decides between failing open and raising ``BackendError``.
The sync and async tiers are deliberately thin so that what differs between them is only the
``await``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from ._stats import Stats
from .exceptions import BackendError, ConfigurationError

log = logging.getLogger("cachelayer")

# What redis-py raises for an unreachable, slow or confused server. OSError covers the odd
# socket error that escapes redis-py's own wrapping.
BACKEND_ERRORS = (RedisError, OSError)


def _client_options(timeout: float) -> dict[str, Any]:
    # redis-py retries three times with backoff by default; a cache must answer within its
    # timeout instead, and fall back to the loader.
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
    }


def _binary(client: Any) -> Any:
    if client.get_connection_kwargs().get("decode_responses"):
        raise ConfigurationError(
            "cachelayer stores msgpack bytes: give it a client made with "
            "decode_responses=False (the default)"
        )
    return client


class BackendHealth:
    """Shared failure policy: count, log state changes, fail open unless strict."""

    __slots__ = ("healthy", "stats", "strict")

    def __init__(self, *, strict: bool, stats: Stats) -> None:
        self.strict = strict
        self.stats = stats
        self.healthy = True

    def ok(self) -> None:
        if not self.healthy:
            self.healthy = True
            log.info("cachelayer: redis reachable again; L2 back in use")

    def failed(self, op: str, exc: BaseException) -> None:
        self.stats.backend_errors += 1
        if self.healthy:
            self.healthy = False
            log.warning(
                "cachelayer: redis %s failed (%s: %s); serving from L1 and the loader",
                op,
                type(exc).__name__,
                exc,
            )
        if self.strict:
            raise BackendError(f"redis {op} failed: {exc}") from exc


class Clients:
    """The Redis clients a cache uses: given ones as they are, or ones it owns, made lazily.

    asyncio clients are bound to the event loop that first used them, so an owned async client
    is made per running loop (a process may run several, one per thread, or one per test).
    """

    def __init__(self, redis_arg: Any, timeout: float) -> None:
        self.url: str | None = None
        self.sync: redis.Redis | None = None
        self.async_given: redis.asyncio.Redis | None = None
        self._async_owned: dict[asyncio.AbstractEventLoop, redis.asyncio.Redis] = {}
        self._lock = threading.Lock()
        self._options = _client_options(timeout)
        if isinstance(redis_arg, str):
            try:
                redis.connection.parse_url(redis_arg)  # type: ignore[no-untyped-call]
            except ValueError as exc:
                raise ConfigurationError(f"malformed redis URL {redis_arg!r}: {exc}") from None
            self.url = redis_arg
        elif isinstance(redis_arg, redis.asyncio.Redis):
            self.async_given = _binary(redis_arg)
        elif isinstance(redis_arg, redis.Redis):
            self.sync = _binary(redis_arg)
        elif redis_arg is not None:
            raise ConfigurationError(
                "redis must be a URL, a redis.Redis, a redis.asyncio.Redis or None, "
                f"not {type(redis_arg).__name__}"
            )
        self.enabled = redis_arg is not None

    @property
    def has_sync(self) -> bool:
        return self.url is not None or self.sync is not None

    @property
    def has_async(self) -> bool:
        return self.url is not None or self.async_given is not None

    def sync_client(self) -> redis.Redis:
        if self.sync is None:
            if self.url is None:
                raise ConfigurationError(
                    "this Cache was given a redis.asyncio.Redis; its sync methods need a "
                    "redis.Redis or a URL (a URL gives the cache both kinds)"
                )
            with self._lock:
                if self.sync is None:
                    self.sync = redis.Redis.from_url(self.url, **self._options)
        return self.sync

    def async_client(self) -> redis.asyncio.Redis:
        if self.async_given is not None:
            return self.async_given
        if self.url is None:
            raise ConfigurationError(
                "this Cache was given a sync redis.Redis; its async methods need a "
                "redis.asyncio.Redis or a URL (a URL gives the cache both kinds)"
            )
        loop = asyncio.get_running_loop()
        client = self._async_owned.get(loop)
        if client is None:
            with self._lock:
                for dead in [lp for lp in self._async_owned if lp.is_closed()]:
                    del self._async_owned[dead]
                client = self._async_owned.setdefault(
                    loop, redis.asyncio.Redis.from_url(self.url, **self._options)
                )
        return client

    def close(self) -> None:
        """Close the owned sync client (clients given to the cache belong to the caller)."""
        if self.url is not None and self.sync is not None:
            self.sync.close()
            self.sync = None

    async def aclose(self) -> None:
        """Close owned clients: the one of the running loop, and the sync one."""
        self.close()
        if self.url is None:
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._async_owned.pop(loop, None)
        if client is not None:
            await client.aclose()


class SyncTier:
    __slots__ = ("clients", "health")

    def __init__(self, clients: Clients, health: BackendHealth) -> None:
        self.clients = clients
        self.health = health

    def get(self, rkey: str) -> bytes | None:
        try:
            data: bytes | None = self.clients.sync_client().get(rkey)  # type: ignore[assignment]
        except BACKEND_ERRORS as exc:
            self.health.failed("get", exc)
            return None
        self.health.ok()
        return data

    def set(self, rkey: str, data: bytes, px: int) -> None:
        try:
            self.clients.sync_client().set(rkey, data, px=px)
        except BACKEND_ERRORS as exc:
            self.health.failed("set", exc)
            return
        self.health.ok()

    def delete(self, rkeys: list[str]) -> None:
        try:
            self.clients.sync_client().delete(*rkeys)
        except BACKEND_ERRORS as exc:
            self.health.failed("delete", exc)
            return
        self.health.ok()


class AsyncTier:
    __slots__ = ("clients", "health")

    def __init__(self, clients: Clients, health: BackendHealth) -> None:
        self.clients = clients
        self.health = health

    async def get(self, rkey: str) -> bytes | None:
        try:
            data: bytes | None = await self.clients.async_client().get(rkey)  # type: ignore[assignment]
        except BACKEND_ERRORS as exc:
            self.health.failed("get", exc)
            return None
        self.health.ok()
        return data

    async def set(self, rkey: str, data: bytes, px: int) -> None:
        try:
            await self.clients.async_client().set(rkey, data, px=px)
        except BACKEND_ERRORS as exc:
            self.health.failed("set", exc)
            return
        self.health.ok()

    async def delete(self, rkeys: list[str]) -> None:
        try:
            await self.clients.async_client().delete(*rkeys)
        except BACKEND_ERRORS as exc:
            self.health.failed("delete", exc)
            return
        self.health.ok()
