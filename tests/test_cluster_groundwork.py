"""The multi-node test deployments work, as seen through redis-py (groundwork for issue 9).

These tests prove the fixtures, not cachelayer: a ``RedisClusterServer`` is a real cluster
(slots on every node, hash-tagged Lua, classic and sharded pub/sub across nodes, a node that
dies and comes back), and a ``SentinelSet`` really fails over. The suites that run cachelayer
itself on these deployments build on them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
from conftest import missing
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS
from redis.sentinel import Sentinel

from cachelayer._cluster_testing import RedisClusterServer, SentinelSet

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _started_cluster() -> RedisClusterServer:
    try:
        return RedisClusterServer().start()
    except FileNotFoundError as exc:
        missing(f"cannot start a Redis Cluster: {exc}")
        raise


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServer]:
    """One 3-primary cluster for the tests that leave it whole."""
    deployment = _started_cluster()
    yield deployment
    deployment.stop()


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterServer]:
    """A cluster of this test's own, free to lose a node."""
    deployment = _started_cluster()
    yield deployment
    deployment.stop()


@pytest.fixture
def rc(cluster: RedisClusterServer) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(cluster.url)
    client.flushall()  # routed to every primary
    yield client
    client.close()


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[SentinelSet]:
    try:
        deployment = SentinelSet().start()
    except FileNotFoundError as exc:
        missing(f"cannot start a Sentinel set: {exc}")
        raise
    yield deployment
    deployment.stop()


def _key_per_slot(client: RedisCluster) -> list[str]:
    """One key for each of the 16384 slots (found by hashing candidates, no hash tags)."""
    keys: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    missing_slots = REDIS_CLUSTER_HASH_SLOTS
    i = 0
    while missing_slots:
        key = f"k{i}"
        slot = client.keyslot(key)
        if keys[slot] is None:
            keys[slot] = key
            missing_slots -= 1
        i += 1
    return [k for k in keys if k is not None]


# --- Cluster -----------------------------------------------------------------------------


def test_cluster_client_sets_and_gets_a_key_in_every_slot(
    cluster: RedisClusterServer, rc: RedisCluster
) -> None:
    keys = _key_per_slot(rc)
    pipe = rc.pipeline()  # a cluster pipeline: commands grouped per node, sent in parallel
    for key in keys:
        pipe.set(key, key)
    assert all(pipe.execute())
    assert rc.mget_nonatomic(keys) == [k.encode() for k in keys]
    # Every primary holds its share: the keys really are spread over three servers.
    sizes = [redis.Redis(port=port).dbsize() for _, port in cluster.startup_nodes]
    assert sum(sizes) == REDIS_CLUSTER_HASH_SLOTS
    assert all(size > 5000 for size in sizes), sizes


def test_plain_mget_across_slots_is_refused(rc: RedisCluster) -> None:
    with pytest.raises(redis.exceptions.RedisClusterException, match="slot"):
        rc.mget("a", "b")  # different slots: what cachelayer's tag_versions does today


def test_lua_over_keys_sharing_a_hash_tag_runs_on_their_node(rc: RedisCluster) -> None:
    script = rc.register_script(
        "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]);"
        "return redis.call('MGET', KEYS[1], KEYS[2])"
    )
    keys = ["ns:v1:{user:1}", "ns:v1:fence:{user:1}"]
    assert rc.keyslot(keys[0]) == rc.keyslot(keys[1])
    assert script(keys=keys, args=["x"]) == [b"x", b"x"]  # EVALSHA, then EVAL on NOSCRIPT
    assert rc.evalsha(script.sha, 2, *keys, "y") == [b"y", b"y"]
    with pytest.raises(redis.exceptions.RedisClusterException):
        rc.eval("return 1", 2, "ns:v1:{a}", "ns:v1:{b}")  # keys in two slots


def test_classic_publish_reaches_subscribers_on_every_node(cluster: RedisClusterServer) -> None:
    # One subscriber per node, the publisher on the first: Cluster broadcasts PUBLISH over
    # the cluster bus, so every node's subscribers hear it.
    publisher = redis.Redis(port=cluster.startup_nodes[0][1])
    subscribers = []
    for _, port in cluster.startup_nodes:
        pubsub = redis.Redis(port=port).pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe("events")
        assert pubsub.get_message(timeout=2) is None  # consumes the subscribe confirmation
        subscribers.append(pubsub)
    assert publisher.publish("events", b"hello") == 1  # PUBLISH counts local receivers only
    for pubsub in subscribers:
        message = _next_message(pubsub.get_message)
        assert message["data"] == b"hello"
        pubsub.close()
    publisher.close()


def test_cluster_pubsub_subscribes_through_the_cluster_client(rc: RedisCluster) -> None:
    pubsub = rc.pubsub()  # a node chosen by the channel's slot
    pubsub.subscribe("events")
    assert _next_message(pubsub.get_message)["type"] == "subscribe"
    # The publisher may be any node: take one other than the subscriber's.
    node = pubsub.get_pubsub_node()
    other = next(n for n in rc.get_primaries() if n.name != node.name)
    rc.publish("events", b"x", target_nodes=other)
    assert _next_message(pubsub.get_message)["data"] == b"x"
    pubsub.close()


def test_sharded_publish_reaches_shard_subscribers_on_every_node(rc: RedisCluster) -> None:
    # Channels whose slots sit on different primaries, so several nodes are involved.
    channels: dict[str, str] = {}
    i = 0
    while len(channels) < len(rc.get_primaries()):
        channel = f"events:{i}"
        channels.setdefault(rc.get_node_from_key(channel).name, channel)
        i += 1
    pubsub = rc.pubsub()
    pubsub.ssubscribe(*channels.values())
    confirmed = {_next_message(pubsub.get_sharded_message)["channel"] for _ in range(len(channels))}
    assert confirmed == {c.encode() for c in channels.values()}
    for channel in channels.values():
        assert rc.spublish(channel, channel.encode()) == 1  # routed to the channel's node
    heard = {_next_message(pubsub.get_sharded_message)["data"] for _ in range(len(channels))}
    assert heard == {c.encode() for c in channels.values()}
    pubsub.close()


def test_async_cluster_client_works_on_the_cluster(cluster: RedisClusterServer) -> None:
    async def main() -> list[bytes | None]:
        nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in cluster.startup_nodes]
        client = redis.asyncio.cluster.RedisCluster(startup_nodes=nodes)
        try:
            await client.set("{t}a", b"1")
            await client.set("{t}b", b"2")
            return await client.mget("{t}a", "{t}b")  # one slot: a plain MGET is fine
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [b"1", b"2"]


def test_killing_and_restarting_a_node_is_observed(own_cluster: RedisClusterServer) -> None:
    client = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in own_cluster.startup_nodes],
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
    )
    victim = own_cluster.node_port(1)
    doomed = next(f"k{i}" for i in range(10_000) if _port_of(client, f"k{i}") == victim)
    spared = next(f"k{i}" for i in range(10_000) if _port_of(client, f"k{i}") != victim)
    client.set(doomed, b"before")
    client.set(spared, b"before")

    own_cluster.stop_node(1)
    started = time.monotonic()
    with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.ClusterDownError)):
        client.get(doomed)
    assert time.monotonic() - started < 15  # redis-py's retries are bounded
    assert client.get(spared) == b"before"  # the other slots keep answering

    own_cluster.start_node(1)
    # Back, and empty: no persistence. The client finds it again without being rebuilt.
    _eventually(lambda: client.get(doomed) is None)
    client.set(doomed, b"after")
    assert client.get(doomed) == b"after"
    client.close()


def _port_of(client: RedisCluster, key: str) -> int:
    return int(client.get_node_from_key(key).port)


# --- Sentinel ----------------------------------------------------------------------------


def test_sentinel_master_for_reads_and_writes(sentinel_set: SentinelSet) -> None:
    sentinel = Sentinel(sentinel_set.sentinels, socket_timeout=0.5)
    primary = sentinel.master_for(sentinel_set.service_name, socket_timeout=0.5)
    primary.set("k", b"v")
    assert primary.get("k") == b"v"
    host, port = sentinel.discover_master(sentinel_set.service_name)
    assert (host, port) == ("127.0.0.1", sentinel_set.primary_port)
    replica = sentinel.slave_for(sentinel_set.service_name, socket_timeout=0.5)
    _eventually(lambda: replica.get("k") == b"v")  # asynchronous replication
    primary.close()
    replica.close()


def test_after_the_primary_dies_a_promoted_replica_answers_writes(
    sentinel_set: SentinelSet,
) -> None:
    sentinel = Sentinel(sentinel_set.sentinels, socket_timeout=0.5)
    primary = sentinel.master_for(
        sentinel_set.service_name, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    primary.set("before", b"1")
    old_port = sentinel_set.primary_port

    started = time.monotonic()
    sentinel_set.kill_primary()
    # The same client object follows the failover: its pool asks the sentinels again when a
    # connection fails. No rebuilding, no restart of the application.
    _eventually(lambda: _writes(primary), timeout=10)
    assert time.monotonic() - started < 20
    assert sentinel.discover_master(sentinel_set.service_name)[1] == sentinel_set.primary_port
    assert sentinel_set.primary_port != old_port
    assert primary.get("before") == b"1"  # replicated before the crash
    primary.close()


def _writes(client: redis.Redis) -> bool:
    try:
        return bool(client.set("after", b"2"))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        return False
    except redis.exceptions.ReadOnlyError:  # reached the old replica before its promotion
        return False


# --- helpers -----------------------------------------------------------------------------


def _next_message(get: Callable[..., Any], timeout: float = 5.0) -> dict[str, Any]:
    """The next pub/sub message from ``get`` (a get_message-like method), within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = get(timeout=0.1)
        if message is not None:
            return dict(message)
    raise AssertionError(f"no pub/sub message within {timeout}s")


def _eventually(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.exceptions.ConnectionError, redis.exceptions.ClusterDownError):
            pass
        assert time.monotonic() < deadline, f"condition not reached within {timeout}s"
        time.sleep(0.02)
