"""How a cache reaches Redis: one server, a Sentinel-managed primary, or a Redis Cluster.

A cache is given a client (it then belongs to the caller) or a URL (the cache then owns the
clients it makes, lazily, and closes them). redis-py has no URL for Sentinel or Cluster, so
cachelayer reads two of its own, in the style Celery and Django use::

    redis+cluster://[user:password@]host:port[,host:port...][/0]
    redis+sentinel://[user:password@]host:port[,host:port...]/service-name[/db]

(``rediss+`` for TLS). A plain ``redis://`` URL to one cluster node would build a
single-node client that fails on every key of the other nodes, so the scheme is explicit.

Besides the clients requests use, a cache needs two for its listener thread: a sync client
to send queued invalidations (even when the cache was given only an asyncio client), and
one to subscribe with. On a Cluster the subscription goes to a primary chosen at random,
so a fleet's subscribers spread over the nodes (a classic PUBLISH reaches every node).
"""

# redis-py leaves its Cluster and Sentinel constructors untyped.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import asyncio
import functools
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from .exceptions import ConfigurationError

T = TypeVar("T")

SINGLE, SENTINEL, CLUSTER = "redis", "sentinel", "cluster"

# What a listener's client copies from the client it was derived from: who to be and how to
# reach the server, never timeouts (ours win).
_IDENTITY = ("db", "username", "password")


def client_options(timeout: float) -> dict[str, Any]:
    # redis-py retries with backoff by default (a cluster client ten times); a cache must
    # answer within its timeout instead, and fall back to the loader.
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }


@dataclass(frozen=True)
class Target:
    """A parsed URL: which topology, and how to reach it."""

    kind: str
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    identity: dict[str, Any] = field(default_factory=dict)


def parse_target(url: str) -> Target:
    scheme, sep, rest = url.partition("://")
    base, _, topology = scheme.partition("+")
    known = base in ("redis", "rediss", "unix") and topology in ("", CLUSTER, SENTINEL)
    if not sep or not known:
        raise ConfigurationError(
            f"malformed redis URL {url!r}: expected redis://, rediss://, unix://, "
            "redis+cluster:// or redis+sentinel:// (rediss+ for TLS)"
        )
    if not topology:
        try:
            redis.connection.parse_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"malformed redis URL {url!r}: {exc}") from None
        return Target(SINGLE, url)
    if base != "unix" and "?" not in rest:
        netloc, _, path = rest.partition("/")
        userinfo, _, hosts = netloc.rpartition("@")
        nodes = tuple(_node(url, part) for part in hosts.split(","))
        parts = [p for p in path.split("/") if p]
        identity: dict[str, Any] = {"ssl": True} if base == "rediss" else {}
        if userinfo:
            user, _, password = userinfo.partition(":")
            identity.update(username=unquote(user) or None, password=unquote(password) or None)
        if topology == CLUSTER and parts in ([], ["0"]):
            return Target(CLUSTER, url, nodes, "", identity)
        if topology == SENTINEL and len(parts) in (1, 2):
            if len(parts) == 2:
                identity["db"] = _number(url, parts[1], "database")
            return Target(SENTINEL, url, nodes, unquote(parts[0]), identity)
    raise ConfigurationError(
        f"malformed redis URL {url!r}: expected redis+cluster://host:port[,host:port...] "
        "(database 0 only) or redis+sentinel://host:port[,host:port...]/service-name[/db], "
        "with no query string"
    )


def _node(url: str, text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port:
        raise ConfigurationError(f"malformed redis URL {url!r}: {text!r} is not host:port")
    return host.strip("[]"), _number(url, port, "port")


def _number(url: str, text: str, what: str) -> int:
    if not text.isdigit():
        raise ConfigurationError(f"malformed redis URL {url!r}: {what} {text!r} is not a number")
    return int(text)


def _binary(client: Any) -> Any:
    if _connection_kwargs(client).get("decode_responses"):
        raise ConfigurationError(
            "cachelayer stores msgpack bytes: give it a client made with "
            "decode_responses=False (the default)"
        )
    return client


def _connection_kwargs(client: Any) -> dict[str, Any]:
    if isinstance(client, redis.cluster.RedisCluster):
        return dict(client.nodes_manager.connection_kwargs)
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        return dict(client.connection_kwargs)
    return dict(client.connection_pool.connection_kwargs)


SYNC_KINDS = (redis.Redis, redis.cluster.RedisCluster)
ASYNC_KINDS = (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)


class Clients:
    """The Redis clients a cache uses: given ones as they are, or ones it owns, made lazily.

    asyncio clients are bound to the event loop that first used them, so an owned async client
    is made per running loop (a process may run several, one per thread, or one per test).
    Owned clients queue for a pooled connection (up to the timeout) rather than failing at
    once in a surge; where redis-py has no blocking pool (asyncio Cluster and Sentinel), a
    semaphore per loop does the queueing.
    """

    def __init__(self, redis_arg: Any, timeout: float, max_connections: int = 50) -> None:
        self.target: Target | None = None
        self.sync: Any = None
        self.async_given: Any = None
        self._async_owned: dict[asyncio.AbstractEventLoop, tuple[Any, Any]] = {}
        self._thread: Any = None
        # The Sentinel objects behind owned clients: their connections to the sentinels
        # (to find the primary) are theirs to close, not the primary's client's.
        self._sync_discovery: list[Any] = []
        self._discovery: dict[asyncio.AbstractEventLoop, Any] = {}
        self._lock = threading.Lock()
        self._options = client_options(timeout)
        self.timeout = timeout
        self._max_connections = max_connections
        if isinstance(redis_arg, str):
            self.target = parse_target(redis_arg)
            self.kind = self.target.kind
        elif isinstance(redis_arg, ASYNC_KINDS):
            self.async_given = _binary(redis_arg)
        elif isinstance(redis_arg, SYNC_KINDS):
            self.sync = _binary(redis_arg)
        elif redis_arg is not None:
            raise ConfigurationError(
                "redis must be a URL, a redis.Redis, a redis.asyncio.Redis, a RedisCluster "
                f"(sync or asyncio) or None, not {type(redis_arg).__name__}"
            )
        if self.target is None and redis_arg is not None:
            self.kind = _kind_of(redis_arg)
        self.enabled = redis_arg is not None
        self.cluster = self.enabled and self.kind == CLUSTER

    @property
    def has_sync(self) -> bool:
        return self.target is not None or self.sync is not None

    @property
    def has_async(self) -> bool:
        return self.target is not None or self.async_given is not None

    # --- the clients requests use ---------------------------------------------------------

    def sync_client(self) -> Any:
        if self.sync is None:
            if self.target is None:
                raise ConfigurationError(
                    "this Cache was given an asyncio client; its sync methods need a sync "
                    "client or a URL (a URL gives the cache both kinds)"
                )
            with self._lock:
                if self.sync is None:
                    self.sync = self._make_sync(self.target)
        return self.sync

    def async_client(self) -> Any:
        if self.async_given is not None:
            return self.async_given
        return self._owned_async()[0]

    def async_pair(self) -> tuple[Any, asyncio.Semaphore | None]:
        """The asyncio client, and the semaphore to queue on where its pool cannot block."""
        if self.async_given is not None:
            return self.async_given, None
        return self._owned_async()

    def _owned_async(self) -> tuple[Any, Any]:
        if self.target is None:
            raise ConfigurationError(
                "this Cache was given a sync client; its async methods need an asyncio "
                "client or a URL (a URL gives the cache both kinds)"
            )
        loop = asyncio.get_running_loop()
        made = self._async_owned.get(loop)
        if made is None:
            with self._lock:
                for dead in [lp for lp in self._async_owned if lp.is_closed()]:
                    del self._async_owned[dead]
                made = self._async_owned.get(loop)
                if made is None:
                    made = self._async_owned[loop] = self._make_async(self.target)
        return made

    def _make_sync(self, target: Target) -> Any:
        opts = {**self._options, "health_check_interval": 30}
        if target.kind == CLUSTER:
            # redis-py honours connection_pool_class only for a client made from a URL.
            (host, port), *others = shuffled(target.nodes)
            identity = {k: v for k, v in target.identity.items() if k != "ssl"}
            return redis.cluster.RedisCluster(
                url=f"{'rediss' if 'ssl' in target.identity else 'redis'}://{host}:{port}",
                startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in others],
                connection_pool_class=redis.BlockingConnectionPool,
                max_connections=self._max_connections,
                timeout=self.timeout,
                **identity,
                **opts,
            )
        if target.kind == SENTINEL:
            # redis-py's Sentinel pool cannot block; sync callers are bounded by threads.
            sentinel = self._sentinel(redis.sentinel.Sentinel, target)
            self._sync_discovery.append(sentinel)
            return sentinel.master_for(target.service, **opts)
        # A blocking pool: in a surge, more concurrent Redis calls than connections must
        # queue for one (up to the timeout, then fail open), not fail at once with "Too many
        # connections" and trip the breaker, as redis-py's default pool does.
        pool = redis.BlockingConnectionPool.from_url(
            target.url, max_connections=self._max_connections, timeout=self.timeout, **opts
        )
        return redis.Redis.from_pool(pool)

    def _make_async(self, target: Target) -> tuple[Any, Any]:
        opts = {**self._options, "retry": redis.asyncio.retry.Retry(NoBackoff(), 0)}
        gate = asyncio.Semaphore(self._max_connections)
        if target.kind == CLUSTER:
            client = redis.asyncio.cluster.RedisCluster(
                startup_nodes=[
                    redis.asyncio.cluster.ClusterNode(h, p) for h, p in shuffled(target.nodes)
                ],
                max_connections=self._max_connections,
                **target.identity,
                **opts,
            )
            return client, gate
        if target.kind == SENTINEL:
            sentinel = self._sentinel(redis.asyncio.sentinel.Sentinel, target)
            self._discovery[asyncio.get_running_loop()] = sentinel
            return sentinel.master_for(target.service, health_check_interval=30, **opts), gate
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            target.url,
            max_connections=self._max_connections,
            timeout=self.timeout,
            health_check_interval=30,
            **opts,
        )
        return redis.asyncio.Redis.from_pool(pool), None

    def _sentinel(self, kind: Any, target: Target) -> Any:
        sentinel_opts = {k: v for k, v in self._options.items() if k != "retry"}
        tls = {"ssl": True} if "ssl" in target.identity else {}
        return kind(
            list(target.nodes),
            sentinel_kwargs={**sentinel_opts, **tls},
            **target.identity,
            **sentinel_opts,
        )

    # --- the listener thread's clients -------------------------------------------------------

    def thread_client(self) -> Any:
        """A sync client for the listener thread's commands (sending queued invalidations),
        reaching the same deployment as the cache's own clients."""
        if self.async_given is None:
            return self.sync_client()
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = self._sync_twin(self.async_given)
        return self._thread

    def _sync_twin(self, client: Any) -> Any:
        kw = _connection_kwargs(client)
        identity: dict[str, Any] = {k: kw[k] for k in _IDENTITY if kw.get(k) is not None}
        ssl = tls_options(client)
        if isinstance(client, redis.asyncio.cluster.RedisCluster):
            identity.pop("db", None)
            # What the client has learned of the cluster, or (before its first command)
            # the nodes it was given.
            known = client.get_nodes() or client.nodes_manager.startup_nodes.values()
            nodes = [redis.cluster.ClusterNode(n.host, n.port) for n in known]
            return redis.cluster.RedisCluster(
                startup_nodes=nodes, **identity, **ssl, **self._options
            )
        pool = client.connection_pool
        if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
            sentinels = [
                s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels
            ]
            addresses = [(kws["host"], kws["port"]) for kws in sentinels]
            sentinel_opts = {k: v for k, v in self._options.items() if k != "retry"}
            sentinel = redis.sentinel.Sentinel(
                addresses, sentinel_kwargs=sentinel_opts, **identity, **ssl, **sentinel_opts
            )
            self._sync_discovery.append(sentinel)
            return sentinel.master_for(pool.service_name, retry=self._options["retry"])
        if "path" in kw:  # a unix socket
            return redis.Redis(unix_socket_path=kw["path"], **identity, **self._options)
        return redis.Redis(
            host=kw.get("host", "localhost"),
            port=kw.get("port", 6379),
            **identity,
            **ssl,
            **self._options,
        )

    def subscriber(self) -> tuple[Any, Any]:
        """A client to subscribe with, and a probe (or None): ``probe(message)`` publishes
        ``message`` on every other primary that answers and returns how many did.

        On a Cluster the client is a primary chosen at random from a fresh view of the
        topology (the subscription may be replacing one on a node that died). A PUBLISH
        reaches it from other nodes only over their links to it, and a node that just
        restarted is not linked for a moment (~60-100 ms measured), so the listener
        hears its own probe from every other primary before it trusts the subscription.
        """
        client = self.thread_client()
        if not isinstance(client, redis.cluster.RedisCluster):
            return client, None
        try:
            client.nodes_manager.initialize()
        except Exception:  # keep the view we have; the subscription attempt will tell
            pass
        kw = client.nodes_manager.connection_kwargs
        identity = {k: kw[k] for k in ("username", "password") if kw.get(k) is not None}
        identity.update(tls_options(client))
        primaries = client.get_primaries()
        for node in shuffled(primaries):
            candidate = redis.Redis(host=node.host, port=node.port, **identity, **self._options)
            try:
                # A node that has just restarted accepts subscribers before it is linked to
                # the others: messages published elsewhere would miss it (~60 ms measured)
                # while this process believed itself subscribed.
                info = candidate.execute_command("CLUSTER INFO")
                if isinstance(info, dict) and info.get("cluster_state") == "ok":
                    others = [n for n in primaries if n is not node]
                    return candidate, functools.partial(_publish_each, client, others)
            except redis.RedisError:
                pass
            candidate.close()
        raise redis.ConnectionError("no cluster primary is up and linked to the others")

    # --- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close owned sync clients (clients given to the cache belong to the caller)."""
        owned = [self._thread] + ([self.sync] if self.target is not None else [])
        self._thread = None
        if self.target is not None:
            self.sync = None
        for client in owned:
            if client is not None:
                client.close()
        discovery, self._sync_discovery = self._sync_discovery, []
        for sentinel in discovery:
            for client in sentinel.sentinels:
                client.close()

    async def aclose(self) -> None:
        """Close owned clients: the one of the running loop, and the sync ones."""
        self.close()
        if self.target is None:
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            made = self._async_owned.pop(loop, None)
            sentinel = self._discovery.pop(loop, None)
        if made is not None:
            await made[0].aclose()
        if sentinel is not None:
            for client in sentinel.sentinels:
                await client.aclose()


def shuffled(items: Sequence[T]) -> list[T]:
    """``items`` in random order. Owned Cluster clients start from shuffled nodes because
    redis-py's asyncio Cluster client asks its first node for the command table and fails
    every call while that node is down: a fleet should not share one such node. Publishing
    picks a random primary for the same reason."""
    return random.sample(items, len(items))


def primary_for(client: Any, key: str) -> Any:
    """The ``redis.Redis`` of the primary serving ``key``'s slot, as the sync Cluster client
    last mapped it; None where the Cluster client must route the call itself (it reads from
    replicas, the slot is unmapped, or the node is not connected yet).

    A GET through the Cluster client costs about 40 us of Python routing on top of the same
    GET on one server (measured, redis-py 8.2); going straight to the node's client does not.
    A caller must fall back to the Cluster client on a redirection or a connection error, so
    that it follows the slot and remaps.
    """
    if client.read_from_replicas or client.load_balancing_strategy is not None:
        return None
    nodes = client.nodes_manager.slots_cache.get(client.keyslot(key))
    return nodes[0].redis_connection if nodes else None


def _publish_each(client: Any, nodes: list[Any], message: tuple[str, bytes]) -> int:
    channel, data = message
    published = 0
    for node in nodes:
        try:
            client.publish(channel, data, target_nodes=node)
            published += 1
        except redis.RedisError:  # down: it can publish nothing, so it cannot be missed
            pass
    return published


def _kind_of(client: Any) -> str:
    if isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)):
        return CLUSTER
    pool = client.connection_pool
    if isinstance(
        pool, (redis.sentinel.SentinelConnectionPool, redis.asyncio.sentinel.SentinelConnectionPool)
    ):
        return SENTINEL
    return SINGLE


def tls_options(client: Any) -> dict[str, Any]:
    """The TLS settings of ``client`` as ``redis.Redis()`` takes them ({} without TLS), for
    the clients made beside it: its listener's, its subscriber's. redis-py records TLS as
    ``ssl=True`` or as an SSL connection class (what a ``rediss://`` URL sets), by client
    kind."""
    kw = _connection_kwargs(client)
    if isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)):
        kind = kw.get("connection_class", object)
    else:
        kind = client.connection_pool.connection_class
    if not (kw.get("ssl") or "ssl" in kind.__name__.lower()):
        return {}
    return {"ssl": True, **{k: v for k, v in kw.items() if k.startswith("ssl_")}}
