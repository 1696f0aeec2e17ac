"""The Redis tier: clients, and get/set/delete that fail open.

Both drivers share one ``BackendHealth``: it counts failures, logs each change of state once
(not once per request), and decides between failing open and raising ``BackendError``.
The sync and async tiers are deliberately thin so that what differs between them is only the
``await``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from ._clients import Clients, primary_for, shuffled
from ._keys import RedisKeys
from ._stats import Stats
from .exceptions import BackendError, CacheError

log = logging.getLogger("cachelayer")

# What redis-py raises for an unreachable, slow or confused server. OSError covers the odd
# socket error that escapes redis-py's own wrapping; a cluster client raises
# RedisClusterException (not a RedisError) when it cannot map a slot to a node.
BACKEND_ERRORS = (RedisError, RedisClusterException, OSError)


class BackendHealth:
    """Shared failure policy: count, log state changes, fail open unless strict, and a
    circuit breaker.

    After ``threshold`` consecutive failures the breaker opens: for ``cooldown`` seconds no
    Redis call is even attempted, so a dead or blackholed Redis costs requests nothing. Then
    one probe is let through; its success closes the breaker, its failure re-opens it.
    """

    __slots__ = (
        "_lock",
        "clock",
        "cooldown",
        "failures",
        "healthy",
        "lagging",
        "open_until",
        "probing",
        "stats",
        "strict",
        "surprises",
        "threshold",
    )

    def __init__(
        self,
        *,
        strict: bool,
        stats: Stats,
        clock: Callable[[], float],
        threshold: int = 3,
        cooldown: float = 5.0,
    ) -> None:
        self.strict = strict
        self.stats = stats
        self.clock = clock
        self.threshold = threshold
        self.cooldown = cooldown
        self.healthy = True
        self.failures = 0
        self.open_until = 0.0
        self.probing = False
        self.lagging = False
        self.surprises: set[type[BaseException]] = set()
        self._lock = threading.Lock()

    @property
    def circuit_open(self) -> bool:
        return self.open_until > 0.0

    def available(self) -> bool:
        """May a Redis call be made now? Closed: yes. Open: no, until the cool-down ends;
        then exactly one caller gets to probe."""
        if not self.open_until:
            return True
        if self.clock() < self.open_until:
            self.stats.breaker_skips += 1
            return False
        with self._lock:
            if self.probing:
                self.stats.breaker_skips += 1
                return False
            self.probing = True
            return True

    def would_allow(self) -> bool:
        """Would ``available()`` say yes now? A look that takes no probe and counts no skip,
        for a caller that asks ``available()`` (through ``_call``) right after."""
        return not self.open_until or (self.clock() >= self.open_until and not self.probing)

    def ok(self) -> None:
        if self.failures or not self.healthy or self.open_until:
            with self._lock:
                self.failures = 0
                self.probing = False
                if self.open_until:
                    self.open_until = 0.0
                    log.info(
                        "cachelayer: circuit closed; redis answers again",
                        extra={"event": "circuit_closed"},
                    )
                if not self.healthy:
                    self.healthy = True
                    log.info(
                        "cachelayer: redis reachable again; L2 back in use",
                        extra={"event": "redis_reachable"},
                    )

    def skipped(self, op: str) -> Any:
        """A call not made because the circuit is open: fail open, or raise if strict."""
        if self.strict:
            raise BackendError(f"redis {op} not attempted: the circuit is open")
        return FAILED

    def settle(self, op: str, exc: BaseException) -> Any:
        """What a Redis call that raised ``exc`` gives its caller: FAILED for Redis trouble
        (fail open), or ``exc`` again (ours, or a cancellation: not Redis's fault)."""
        if isinstance(exc, BACKEND_ERRORS):
            self.failed(op, exc)
            return FAILED
        if isinstance(exc, CacheError) or not isinstance(exc, Exception):
            # A sync call on an asyncio-only cache is the caller's to see; cancelled mid-call
            # is neither a success nor a failure.
            self.abandoned()
            raise exc
        self.failed(op, exc, unexpected=True)  # redis-py failed us in a way it did not mean
        return FAILED

    def abandoned(self) -> None:
        """A call ended without an answer (cancelled, or an unexpected error). If it was the
        half-open probe, let the next call probe instead of leaving the circuit open for
        good."""
        if self.probing:
            with self._lock:
                self.probing = False

    def unconfirmed(self, wanted: int, acked: Any) -> Any:
        """Redis took an invalidation but too few replicas acknowledged it in time: a
        failover now could lose it. Not a Redis failure (the breaker stays shut); the caller
        queues it to be sent again."""
        self.stats.invalidations_unconfirmed += 1
        if not self.lagging:
            self.lagging = True
            log.warning(
                "cachelayer: an invalidation reached %s of %d replicas in time; queued to be "
                "sent again",
                acked,
                wanted,
                extra={"event": "replicas_behind"},
            )
        if self.strict:
            raise BackendError(f"invalidation acknowledged by {acked} of {wanted} replicas")
        return FAILED

    def confirmed(self) -> None:
        if self.lagging:
            self.lagging = False
            log.info("cachelayer: replicas acknowledge invalidations again")

    def failed(self, op: str, exc: BaseException, unexpected: bool = False) -> None:
        if unexpected and type(exc) not in self.surprises:
            # Not an error redis-py means to raise (its asyncio Cluster client has raised
            # AttributeError for a connection torn down under it), but Redis failed us all
            # the same: fail open, and show the traceback once, for a bug report.
            self.surprises.add(type(exc))
            log.error("cachelayer: the redis client raised unexpectedly in %s", op, exc_info=exc)
        self.stats.backend_errors += 1
        with self._lock:
            self.failures += 1
            was_probing, self.probing = self.probing, False
            if was_probing or (self.failures >= self.threshold and not self.open_until):
                if not self.open_until:
                    self.stats.breaker_opened += 1
                    log.warning(
                        "cachelayer: circuit open for %.1fs after %d redis failures; "
                        "serving from L1 and the loader",
                        self.cooldown,
                        self.failures,
                        extra={"event": "circuit_open"},
                    )
                self.open_until = self.clock() + self.cooldown
            if self.healthy:
                self.healthy = False
                log.warning(
                    "cachelayer: redis %s failed (%s: %s); serving from L1 and the loader",
                    op,
                    type(exc).__name__,
                    exc,
                    extra={"event": "redis_unreachable", "op": op},
                )
        if self.strict:
            raise BackendError(f"redis {op} failed: {exc}") from exc


# Redis is the arbiter of "was this key invalidated while I loaded it?": every write, delete
# or expire bumps the key's fence, every load remembers the fence it read, and its write is
# refused if the fence moved. A fence is a plain string "<counter>:<expired-at>" (not a hash)
# so that a read is one MGET of the value and its fence: a plain command is cheaper than a
# script on the path every L2 hit takes. Fences outlive any load we would still accept (an
# hour), then expire.
FENCE_PX = 3_600_000

# KEYS: lease, wait-flag. ARGV: token, lease ms. Returns {1, 0} when taken (also when it is
# already ours: a retry after a lost reply must not wait on its own lease), else
# {0, ms left on the holder's lease}, and flags that someone waits, so the holder publishes.
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0} end
if redis.call('GET', KEYS[1]) == ARGV[1] then return {1, 0} end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return {0, redis.call('PTTL', KEYS[1])}
"""

# KEYS: value, lease, fence, wait-flag. ARGV: data, ms, token, fence read at load start,
# channel, message, write?. Writes only if the fence has not moved; releases our lease; wakes
# waiters if any. Returns 1 if written.
FILL = """
local written = 0
local fence = redis.call('GET', KEYS[3]) or ''
if ARGV[7] == '1' and fence == ARGV[4] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  written = 1
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
if redis.call('DEL', KEYS[4]) == 1 then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return written
"""

# KEYS: value, fence. ARGV: mode ('set', 'del' or 'exp'), data, ms, fence ms, now. An
# explicit write, delete or expire moves the fence, so a load that began before it cannot
# land after it; an expire also records when, so older envelopes read as stale.
WRITE = """
local counter, expired = string.match(redis.call('GET', KEYS[2]) or '0:', '^(%d*):(.*)$')
if ARGV[1] == 'set' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
elseif ARGV[1] == 'del' then redis.call('DEL', KEYS[1])
else expired = ARGV[5] end
redis.call('SET', KEYS[2], (tonumber(counter) or 0) + 1 .. ':' .. (expired or ''), 'PX', ARGV[4])
return 1
"""

_SHA = {src: hashlib.sha1(src.encode()).hexdigest() for src in (ACQUIRE, FILL, WRITE)}

# What a tier returns when Redis could not be asked (failed, or the circuit is open). The
# flow then stops using Redis for the rest of that request, so one request pays at most one
# timeout.
FAILED: Any = type("FAILED", (), {"__repr__": lambda self: "FAILED", "__slots__": ()})()


class Change:
    """What one invalidation call (or batch) does in Redis, sent as one pipeline."""

    __slots__ = ("deleted", "expired", "message", "now", "tags", "written")

    def __init__(self, now: float) -> None:
        self.now = now
        self.written: list[tuple[str, bytes, int]] = []
        self.deleted: list[str] = []
        self.expired: list[str] = []
        self.tags: list[str] = []
        self.message: bytes | None = None

    def __bool__(self) -> bool:
        return bool(self.written or self.deleted or self.expired or self.tags)


class _Ops:
    """The Redis requests of a read-through, built once; drivers only send them."""

    __slots__ = ("clients", "cluster", "health", "keys", "replicas")

    def __init__(
        self, clients: Clients, health: BackendHealth, keys: RedisKeys, replicas: int = 0
    ) -> None:
        self.clients = clients
        self.health = health
        self.keys = keys
        self.cluster = clients.cluster
        self.replicas = replicas

    def fill_args(
        self, key: str, data: bytes, px: int, token: str, fence: str, write: bool
    ) -> tuple[list[str], list[Any]]:
        message = _fill_message(key)
        args = [data, px, token, fence, self.keys.channel, message, "1" if write else "0"]
        return list(self.keys.coordination(key)), args

    def commands(self, change: Change) -> list[tuple[Any, ...]]:
        """A change's commands: fenced writes, tag bumps, then (on one server) the news
        and the replicas' acknowledgement.

        EVAL, not EVALSHA: a pipeline runs every command even when one fails, so retrying
        after NOSCRIPT would publish and bump tags twice. The script is a few hundred bytes.
        Raw commands, because a Cluster pipeline has no ``eval`` method.
        """
        out: list[tuple[Any, ...]] = []
        for key, data, px in change.written:
            value, _, fence, _ = self.keys.coordination(key)
            out.append(("EVAL", WRITE, 2, value, fence, "set", data, px, FENCE_PX, change.now))
        for mode, keys in (("del", change.deleted), ("exp", change.expired)):
            for key in keys:
                value, _, fence, _ = self.keys.coordination(key)
                out.append(("EVAL", WRITE, 2, value, fence, mode, "", 0, FENCE_PX, change.now))
        for tag in change.tags:
            out.append(("INCR", self.keys.tag(tag)))
        if self.cluster:  # a Cluster pipeline refuses PUBLISH: see _send_change
            return out
        if change.message is not None:
            out.append(("PUBLISH", self.keys.channel, change.message))
        if self.replicas:
            # Acknowledged by a primary alone, an invalidation dies with it in a failover,
            # and the promoted replica would serve the value it removed. Half the socket
            # timeout, so a slow replica is an answer ("too few"), not a timed-out
            # connection counted against the breaker.
            wait_ms = max(1, int(self.clients.timeout * 500))
            out.append(("WAIT", self.replicas, wait_ms))
        return out

    def confirmed(self, results: Any) -> Any:
        """The pipeline's results, or FAILED if too few replicas acknowledged them."""
        if results is FAILED or not self.replicas:
            return results
        acked = results[-1]
        if isinstance(acked, int) and acked >= self.replicas:
            self.health.confirmed()
            return results
        return self.health.unconfirmed(self.replicas, acked)

    def retry_allowed(self, began: float) -> bool:
        """Is a connection error worth one more try? One that came fast is: a pooled
        connection to a server that restarted (or a node that failed over) fails once, and
        a fresh one may not; every request here is idempotent. One that took half the
        timeout or more (no pooled connection free, a connect that hung) is not: a call pays
        at most one timeout."""
        return time.monotonic() - began < self.clients.timeout / 2

    def past_breaker(self, op: str) -> bool:
        """Does ``op`` go to Redis even with the circuit open?

        A fill that holds a lease does: it is the only thing that will ever release it,
        and skipped it would leave every process of the fleet waiting out the lease's TTL
        for a holder that has finished (the lease was taken moments ago, so Redis was
        there). Invalidations on a Cluster do: one dead node opens the circuit, yet
        processes listening on the other nodes keep their copies unless told.
        """
        return op == "fill" or (self.cluster and op == "invalidate")

    def tag_keys(self, tags: tuple[str, ...]) -> list[str]:
        return [self.keys.tag(t) for t in tags]


def _fill_message(key: str) -> bytes:
    return msgpack.packb(["fill", "", key], use_bin_type=True)  # type: ignore[no-any-return]


def _text(raw: Any) -> str:
    return "" if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)


def _read_result(got: Any) -> Any:
    """``(envelope bytes or None, fence text, expired-at or None)`` or FAILED."""
    if got is FAILED:
        return got
    data, fence = got
    fence = _text(fence)
    try:
        expired = float(fence.partition(":")[2] or "nan")
    except ValueError:  # not a fence we wrote: no expiry to honour
        expired = float("nan")
    return data, fence, None if expired != expired else expired


def _versions(got: Any) -> Any:
    return got if got is FAILED else [int(v) if v is not None else 0 for v in got]


def _routed_mget(client: Any, *keys: str) -> Any:
    """MGET of keys in one slot, straight to its primary (see ``primary_for``)."""
    node = primary_for(client, keys[0])
    if node is not None:
        try:
            return node.mget(*keys)
        except (ResponseError, RedisConnectionError):
            pass  # moved, or its node is gone: the Cluster client follows and remaps
    return client.mget(*keys)


class SyncTier(_Ops):
    def _call(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.health.available() and not self.past_breaker(op):
            return self.health.skipped(op)
        began = time.monotonic()
        try:
            try:
                result = fn(self.clients.sync_client(), *args)
            except RedisConnectionError:
                if not self.retry_allowed(began):
                    raise
                result = fn(self.clients.sync_client(), *args)
        except BaseException as exc:
            return self.health.settle(op, exc)
        self.health.ok()
        return result

    @staticmethod
    def _eval(client: Any, src: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return client.evalsha(_SHA[src], len(keys), *keys, *args)
        except NoScriptError:  # a restarted server forgot its scripts
            return client.eval(src, len(keys), *keys, *args)

    def read(self, key: str) -> Any:
        value, _, fence, _ = self.keys.coordination(key)
        if self.cluster:
            return _read_result(self._call("get", _routed_mget, value, fence))
        return _read_result(self._call("get", lambda c: c.mget(value, fence)))

    def tag_versions(self, tags: tuple[str, ...]) -> Any:
        keys = self.tag_keys(tags)
        if self.cluster:  # tags live in many slots: one MGET per node
            return _versions(self._call("tags", lambda c: c.mget_nonatomic(keys)))
        return _versions(self._call("tags", lambda c: c.mget(keys)))

    def acquire(self, key: str, token: str, px: int) -> Any:
        _, lease, _, wait = self.keys.coordination(key)
        return self._call("lease", self._eval, ACQUIRE, [lease, wait], [token, px])

    def fill(self, key: str, data: bytes, px: int, token: str, fence: str, write: bool) -> Any:
        keys, args = self.fill_args(key, data, px, token, fence, write)
        return self._call("fill" if token else "set", self._eval, FILL, keys, args)

    def _send_change(self, client: Any, change: Change) -> Any:
        commands = self.commands(change)
        if not self.cluster:
            return self._pipelined(client, commands)
        try:
            try:
                return self._pipelined(client, commands)
            except BACKEND_ERRORS:
                # A Cluster pipeline that cannot reach one node sends nothing to the others
                # (seen with redis-py 8.1): one command at a time, so their parts land.
                results: list[Any] = []
                error: BaseException | None = None
                for command in commands:
                    try:
                        results.append(client.execute_command(*command))
                    except BACKEND_ERRORS as exc:
                        error = error or exc
                if error is not None:
                    raise error from None
                return results
        finally:
            if change.message is not None:
                # Processes listening on the nodes that answer would otherwise keep their
                # copies: tell them even if one node missed its part (which stays queued
                # here and is sent again).
                self._publish_on_cluster(client, change.message)

    @staticmethod
    def _pipelined(client: Any, commands: list[tuple[Any, ...]]) -> Any:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute()

    def _publish_on_cluster(self, client: Any, message: bytes) -> Any:
        """PUBLISH on any primary that answers: from any node it reaches every node's
        subscribers, and the client's default node may be the one that died."""
        error: BaseException | None = None
        for node in shuffled(client.get_primaries()):
            try:
                return client.publish(self.keys.channel, message, target_nodes=node)
            except BACKEND_ERRORS as exc:
                error = exc
        raise error or RedisClusterException("no primary to publish on")

    def apply(self, change: Change) -> Any:
        return self.confirmed(self._call("invalidate", self._send_change, change))

    def release_with(self, client: Any, key: str, token: str) -> Any:
        """Release a lease (and wake its waiters) through another client (the listener
        thread's); nothing happens unless ``token`` still holds it."""
        keys, args = self.fill_args(key, b"", 0, token, "", False)
        return self._call("fill", lambda _: self._eval(client, FILL, keys, args))

    def apply_with(self, client: Any, change: Change) -> Any:
        """``apply`` through another client (the listener thread's)."""
        return self.confirmed(self._call("invalidate", lambda _: self._send_change(client, change)))


class AsyncTier(_Ops):
    async def _call(self, op: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if not self.health.available() and not self.past_breaker(op):
            return self.health.skipped(op)
        began = time.monotonic()
        try:
            client, gate = self.clients.async_pair()
            try:
                result = await self._attempt(gate, fn, client, args)
            except RedisConnectionError:
                if not self.retry_allowed(began):
                    raise
                result = await self._attempt(gate, fn, client, args)
        except BaseException as exc:
            return self.health.settle(op, exc)
        self.health.ok()
        return result

    @staticmethod
    async def _pipelined(client: Any, commands: list[tuple[Any, ...]]) -> Any:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute()

    async def _publish_on_cluster(self, client: Any, message: bytes) -> Any:
        """As ``SyncTier._publish_on_cluster``."""
        error: BaseException | None = None
        for node in shuffled(client.get_primaries()):
            try:
                return await client.publish(self.keys.channel, message, target_nodes=node)
            except BACKEND_ERRORS as exc:
                error = exc
        raise error or RedisClusterException("no primary to publish on")

    async def _attempt(
        self,
        gate: asyncio.Semaphore | None,
        fn: Callable[..., Awaitable[Any]],
        client: Any,
        args: Any,
    ) -> Any:
        """One try; where the client's pool cannot block, wait for a connection slot as a
        blocking pool would: up to the timeout."""
        if gate is None:
            return await fn(client, *args)
        if gate.locked():
            try:
                await asyncio.wait_for(gate.acquire(), self.clients.timeout)
            except asyncio.TimeoutError:
                raise RedisConnectionError("no redis connection free within the timeout") from None
        else:
            await gate.acquire()
        try:
            return await fn(client, *args)
        finally:
            gate.release()

    @staticmethod
    async def _eval(client: Any, src: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(_SHA[src], len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(src, len(keys), *keys, *args)

    async def read(self, key: str) -> Any:
        value, _, fence, _ = self.keys.coordination(key)

        async def mget(c: Any) -> Any:
            return await c.mget(value, fence)

        return _read_result(await self._call("get", mget))

    async def tag_versions(self, tags: tuple[str, ...]) -> Any:
        keys = self.tag_keys(tags)

        async def mget(c: Any) -> Any:
            if self.cluster:
                return await c.mget_nonatomic(keys)
            return await c.mget(keys)

        return _versions(await self._call("tags", mget))

    async def acquire(self, key: str, token: str, px: int) -> Any:
        _, lease, _, wait = self.keys.coordination(key)
        return await self._call("lease", self._eval, ACQUIRE, [lease, wait], [token, px])

    async def fill(
        self, key: str, data: bytes, px: int, token: str, fence: str, write: bool
    ) -> Any:
        keys, args = self.fill_args(key, data, px, token, fence, write)
        return await self._call("fill" if token else "set", self._eval, FILL, keys, args)

    async def apply(self, change: Change) -> Any:
        async def run(client: Any) -> Any:  # as SyncTier._send_change
            commands = self.commands(change)
            if not self.cluster:
                return await self._pipelined(client, commands)
            try:
                try:
                    return await self._pipelined(client, commands)
                except BACKEND_ERRORS:
                    results = await asyncio.gather(
                        *(client.execute_command(*command) for command in commands),
                        return_exceptions=True,
                    )
                    for result in results:
                        if isinstance(result, BaseException):
                            raise result from None
                    return results
            finally:
                if change.message is not None:
                    await self._publish_on_cluster(client, change.message)

        return self.confirmed(await self._call("invalidate", run))
