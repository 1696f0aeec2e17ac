"""Throwaway multi-node Redis deployments for tests: a Redis Cluster and a Sentinel set.

Like ``cachelayer.testing.RedisServer`` these are real ``redis-server`` processes on free
127.0.0.1 ports with no persistence, so what the tests prove is what a real deployment does
(slot routing, MOVED redirections, gossip, failover), which no fake reproduces.

* ``RedisClusterServer``: N primaries (optionally one replica each) created with
  ``redis-cli --cluster create``; one node can be killed and restarted.
* ``SentinelSet``: one primary, one replica and three sentinels; ``kill_primary()`` SIGKILLs
  the primary and returns once the sentinels have promoted the replica.

Every wait is bounded, and each object stops its processes and deletes its temp dir on
``stop()``, on leaving its ``with`` block, and at interpreter exit (``atexit``) as a last
resort. Status is read over a raw socket (a few lines of RESP) rather than with redis-py, so
the fixtures cannot be confused by the client behaviour the tests are about.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from .testing import free_port

HOST = "127.0.0.1"
Reply = bytes | int | str | list["Reply"] | None
T = TypeVar("T")


class DeploymentError(RuntimeError):
    """A test deployment did not come up (or fail over) in time."""


# --- a minimal RESP client: enough for PING, INFO, CLUSTER INFO and SENTINEL queries -------


def command(port: int, *args: str, timeout: float = 1.0) -> Reply:
    """Send one command to ``127.0.0.1:port`` and return its decoded reply.

    An error reply is returned as ``str`` starting with ``"-"`` rather than raised: the
    callers poll, and "not ready yet" (``-CLUSTERDOWN``, ``-LOADING``) is an answer to them.
    """
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        raw = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(raw), raw)
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(payload)
        reader = sock.makefile("rb")
        return _read_reply(reader.readline, reader.read)


def _read_reply(readline: Callable[[], bytes], read: Callable[[int], bytes]) -> Reply:
    line = readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed mid-reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return "-" + rest.decode()
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else read(size + 2)[:-2]
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read_reply(readline, read) for _ in range(size)]
    raise ConnectionError(f"unexpected RESP reply {line!r}")


def query(port: int, *args: str) -> Reply:
    """``command`` that answers None when the port does not (yet, or any more) accept."""
    try:
        return command(port, *args)
    except OSError:
        return None


def info_fields(reply: Reply) -> dict[str, str]:
    """``INFO`` / ``CLUSTER INFO`` text as a dict (empty when the reply is not text)."""
    if not isinstance(reply, bytes):
        return {}
    fields = {}
    for line in reply.decode().splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name] = value.strip()
    return fields


def wait_until(what: str, probe: Callable[[], T | None], timeout: float) -> T:
    """Poll ``probe`` until it returns something truthy; raise ``DeploymentError`` after
    ``timeout`` seconds. Polls fast at first (most waits end in milliseconds), then backs off
    to 100 ms so a slow failover does not spin a core."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise DeploymentError(f"{what}: not reached within {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


# --- processes ---------------------------------------------------------------------------


class _Process:
    """One redis-server (or sentinel) process: its port, arguments and working directory.

    The arguments are kept so that ``start()`` after ``kill()`` brings back the same node:
    for Cluster, the same port and ``nodes.conf`` mean the same node ID, so it rejoins the
    cluster instead of being a stranger.
    """

    def __init__(self, args: list[str], port: int, workdir: str) -> None:
        self.args = args
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        log = open(os.path.join(self.workdir, "server.log"), "ab")  # noqa: SIM115 - owned by Popen
        try:
            self.proc = subprocess.Popen(
                self.args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()  # the child has its own copy of the descriptor

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise DeploymentError(
                    f"{self.args[0]} on port {self.port} exited with {self.proc.returncode}; "
                    f"see {self.workdir}/server.log"
                )
            return query(self.port, "PING") == "PONG"

        wait_until(f"redis on port {self.port} answers PING", answers, timeout)

    def kill(self) -> None:
        """SIGKILL, not SIGTERM: a crash is what failover has to survive, and a clean
        shutdown would let a primary hand over to its replica first."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


class _Deployment:
    """What both deployments share: a temp dir, processes in it, and stopping them all."""

    def __init__(self, binary: str | None, prefix: str) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise FileNotFoundError("redis-server is not installed")
        self.binary = found
        self._prefix = prefix
        self._dir: str | None = None
        self._procs: list[_Process] = []

    def _workdir(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix=self._prefix)
            # Registered per deployment so a test that forgets stop() (or fails before its
            # finally) leaves no server behind when the interpreter exits.
            atexit.register(self.stop)
        return self._dir

    def _add(self, name: str, args: list[str], port: int) -> _Process:
        proc = _Process([self.binary, *args], port, os.path.join(self._workdir(), name))
        self._procs.append(proc)
        return proc

    def stop(self) -> None:
        """Kill every process and delete the temp dir; safe to call twice."""
        for proc in self._procs:
            proc.kill()
        self._procs = []
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
            atexit.unregister(self.stop)


def _server_args(port: int) -> list[str]:
    # No RDB, no AOF: a restarted node comes back empty, like RedisServer. Loopback only.
    return [
        "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
        "--protected-mode", "yes", "--loglevel", "notice", "--dir", ".",
    ]  # fmt: skip


# --- Redis Cluster -----------------------------------------------------------------------


class RedisClusterServer(_Deployment):
    """A private Redis Cluster: ``primaries`` primaries, each with ``replicas`` replicas.

    ``startup_nodes`` are ``(host, port)`` pairs (build ``redis.cluster.ClusterNode`` or its
    asyncio twin from them); ``url`` suits ``RedisCluster.from_url``. ``stop_node(i)`` kills
    node ``i`` (primaries come first, in slot order); ``start_node(i)`` brings it back, empty,
    under its old node ID, and waits until the cluster is whole again.

    ``node_timeout_ms`` is short (the default is 15 s) so that a killed node is noticed, and a
    replica promoted, within a couple of seconds instead of the better part of a minute.
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 0,
        *,
        binary: str | None = None,
        cli: str | None = None,
        node_timeout_ms: int = 1000,
    ) -> None:
        super().__init__(binary, "cachelayer-cluster-")
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        found_cli = cli or shutil.which("redis-cli")
        if found_cli is None:
            raise FileNotFoundError("redis-cli is not installed")
        self.cli = found_cli
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, port) for port in self.ports]

    @property
    def url(self) -> str:
        # Any one node will do: redis-py discovers the rest with CLUSTER SLOTS.
        return f"redis://{HOST}:{self.ports[0]}/0"

    @property
    def cache_url(self) -> str:
        """The URL to give a ``Cache``: every node, so any one may be down at start-up."""
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)

    def start(self, timeout: float = 30.0) -> RedisClusterServer:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        count = self.primaries * (1 + self.replicas)
        self.ports = _distinct_free_ports(count)
        for i, port in enumerate(self.ports):
            args = [
                *_server_args(port),
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # A killed primary without a replica then fails only its own slots' commands,
                # as a real partial outage does; the rest of the cluster keeps answering.
                "--cluster-require-full-coverage", "no",
            ]  # fmt: skip
            self._add(f"node{i}", args, port).start(_left(deadline))
        create = [self.cli, "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports)]
        create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        try:
            done = subprocess.run(create, capture_output=True, timeout=_left(deadline))
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"redis-cli --cluster create took over {timeout}s") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise DeploymentError(f"redis-cli --cluster create failed:\n{output}")
        self.wait_healthy(_left(deadline))
        # redis-cli assigns roles as it likes with replicas: list primaries first, so that
        # node i < primaries is a primary and stop_node(0) means "a primary dies".
        roles = {p: info_fields(query(p, "INFO", "replication")).get("role") for p in self.ports}
        self.ports.sort(key=lambda p: roles[p] != "master")
        order = {p: i for i, p in enumerate(self.ports)}
        self._procs.sort(key=lambda proc: order[proc.port])

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running node says ``cluster_state:ok`` with all slots assigned
        and agrees on the number of known nodes, and every replica is in sync."""
        running = [proc.port for proc in self._procs if proc.running]

        def healthy() -> bool:
            for port in running:
                fields = info_fields(query(port, "CLUSTER", "INFO"))
                if fields.get("cluster_state") != "ok":
                    return False
                if fields.get("cluster_slots_assigned") != "16384":
                    return False
                if fields.get("cluster_known_nodes") != str(len(self.ports)):
                    return False
                # cluster_state is judged per node: also require that no node still flags
                # another as failing, or clients may be sent to a node that just came back.
                if fields.get("cluster_slots_fail") != "0":
                    return False
                repl = info_fields(query(port, "INFO", "replication"))
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    return False
            return True

        wait_until("cluster_state:ok on every node", healthy, timeout)

    def node_port(self, i: int) -> int:
        return self._procs[i].port

    def stop_node(self, i: int, timeout: float = 30.0) -> None:
        """SIGKILL node ``i``. With replicas, also wait until one of them has taken over its
        slots (``cluster_state:ok`` again); without, its slots stay down until restarted."""
        self._procs[i].kill()
        if self.replicas:
            self._wait_failed_over(self._procs[i].port, timeout)

    def _wait_failed_over(self, dead: int, timeout: float) -> None:
        live = [proc.port for proc in self._procs if proc.running]

        def promoted() -> bool:
            for port in live:
                fields = info_fields(query(port, "CLUSTER", "INFO"))
                if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_fail") != "0":
                    return False
                nodes = query(port, "CLUSTER", "NODES")
                if not isinstance(nodes, bytes):
                    return False
                # The dead node must be known to have failed and to own no slots any more.
                for line in nodes.decode().splitlines():
                    parts = line.split()
                    # Fields: id, addr@bus, flags, ...; slot ranges only after the 8th.
                    is_dead = parts[1].split("@")[0] == f"{HOST}:{dead}"
                    if is_dead and ("fail" not in parts[2].split(",") or len(parts) > 8):
                        return False
            return True

        wait_until(f"a replica of the node on port {dead} took over", promoted, timeout)

    def start_node(self, i: int, timeout: float = 30.0) -> None:
        """Restart node ``i`` (empty, same port and node ID) and wait for a healthy cluster.
        A restarted former primary whose replica was promoted comes back as a replica."""
        deadline = time.monotonic() + timeout
        self._procs[i].start(_left(deadline))
        self.wait_healthy(_left(deadline))

    def __enter__(self) -> RedisClusterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Sentinel ----------------------------------------------------------------------------


class SentinelSet(_Deployment):
    """One primary, one replica and three sentinels watching them as ``service_name``.

    ``sentinels`` are ``(host, port)`` pairs for ``redis.sentinel.Sentinel``. Sentinels judge
    the primary down after ``down_after_ms`` (1 s, not the default 30 s) so a failover takes
    a few seconds; a quorum of 2 out of 3 must agree, as in a real deployment.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        service_name: str = "cachelayer",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10_000,
    ) -> None:
        super().__init__(binary, "cachelayer-sentinel-")
        self.service_name = service_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self._data: list[_Process] = []  # [current primary, replica]; reordered on failover
        self._sentinels: list[_Process] = []

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [(HOST, proc.port) for proc in self._sentinels]

    @property
    def primary_port(self) -> int:
        return self._data[0].port

    @property
    def replica_port(self) -> int:
        return self._data[1].port

    @property
    def cache_url(self) -> str:
        """The URL to give a ``Cache``: the sentinels and the service they watch."""
        nodes = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"redis+sentinel://{nodes}/{self.service_name}"

    def start(self, timeout: float = 30.0) -> SentinelSet:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        primary_port, replica_port, *sentinel_ports = _distinct_free_ports(5)
        primary = self._add("primary", _server_args(primary_port), primary_port)
        replica_args = [*_server_args(replica_port), "--replicaof", HOST, str(primary_port)]
        replica = self._add("replica", replica_args, replica_port)
        self._data = [primary, replica]
        primary.start(_left(deadline))
        replica.start(_left(deadline))
        wait_until(
            "the replica is in sync",
            lambda: (
                info_fields(query(replica_port, "INFO", "replication")).get("master_link_status")
                == "up"
            ),
            _left(deadline),
        )
        for i, port in enumerate(sentinel_ports):
            # Sentinel rewrites its config file (it records peers and epochs there), so each
            # gets its own, in its own directory.
            proc = self._add(f"sentinel{i}", [], port)
            os.makedirs(proc.workdir)
            conf = os.path.join(proc.workdir, "sentinel.conf")
            with open(conf, "w") as f:
                f.write(
                    f"port {port}\nbind {HOST}\ndaemonize no\ndir {proc.workdir}\n"
                    f"sentinel monitor {self.service_name} {HOST} {primary_port} 2\n"
                    f"sentinel down-after-milliseconds {self.service_name} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.service_name} {self.failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {self.service_name} 1\n"
                )
            proc.args = [self.binary, conf, "--sentinel"]
            self._sentinels.append(proc)
            proc.start(_left(deadline))
        # Sentinels find each other and the replica through the primary (hello messages every
        # 2 s, INFO every 10 s at most): only when each knows both is a failover possible.
        self._wait_sentinels(primary_port, _left(deadline))

    def _wait_sentinels(self, primary_port: int, timeout: float) -> None:
        def agreed() -> bool:
            for proc in self._sentinels:
                if not proc.running:
                    continue
                addr = query(proc.port, "SENTINEL", "get-master-addr-by-name", self.service_name)
                if addr != [HOST.encode(), str(primary_port).encode()]:
                    return False
                state = _pairs(query(proc.port, "SENTINEL", "master", self.service_name))
                if state.get("num-other-sentinels") != str(len(self._sentinels) - 1):
                    return False
                if state.get("num-slaves") != "1" or "s_down" in state.get("flags", ""):
                    return False
                ok = query(proc.port, "SENTINEL", "ckquorum", self.service_name)
                if not (isinstance(ok, str) and ok.startswith("OK")):
                    return False
            return True

        wait_until("every sentinel knows the primary, the replica and its peers", agreed, timeout)

    def kill_primary(self, timeout: float = 30.0) -> None:
        """SIGKILL the primary and wait until every sentinel names the replica as primary and
        the replica says it is one (it then accepts writes)."""
        self._data[0].kill()
        self.wait_promoted(timeout)

    def wait_promoted(self, timeout: float = 30.0) -> None:
        """Wait for the replica's promotion after the primary died (``kill_primary`` kills
        it first; a test may kill ``self._data[0]`` itself at a moment of its choosing)."""
        old, new = self._data

        def promoted() -> bool:
            role = info_fields(query(new.port, "INFO", "replication")).get("role")
            if role != "master":
                return False
            want = [HOST.encode(), str(new.port).encode()]
            return all(
                query(s.port, "SENTINEL", "get-master-addr-by-name", self.service_name) == want
                for s in self._sentinels
                if s.running
            )

        wait_until("the sentinels promoted the replica", promoted, timeout)
        # The dead primary is now the spare: restart_old_primary() brings it back as a replica.
        self._data = [new, old]

    def freeze_replica(self) -> None:
        """SIGSTOP the replica: it stays connected but takes nothing from the primary, as a
        stalled or partitioned replica would, until ``thaw_replica()``."""
        proc = self._data[1].proc
        assert proc is not None, "the replica is not running"
        proc.send_signal(signal.SIGSTOP)

    def thaw_replica(self) -> None:
        proc = self._data[1].proc
        assert proc is not None, "the replica is not running"
        proc.send_signal(signal.SIGCONT)

    def restart_old_primary(self, timeout: float = 30.0) -> None:
        """Start the killed primary again. It comes back believing it is a primary (empty);
        the sentinels reconfigure it as a replica of the new one; wait for that."""
        deadline = time.monotonic() + timeout
        primary, spare = self._data
        spare.start(_left(deadline))

        def rejoined() -> bool:
            fields = info_fields(query(spare.port, "INFO", "replication"))
            up = fields.get("master_link_status") == "up"
            return up and fields.get("master_port") == str(primary.port)

        wait_until("the old primary rejoined as a replica", rejoined, _left(deadline))

    def stop(self) -> None:
        super().stop()
        self._data = []
        self._sentinels = []

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- helpers -----------------------------------------------------------------------------


def _left(deadline: float) -> float:
    """Seconds until ``deadline``, never below a small floor (so a step still gets a try)."""
    return max(deadline - time.monotonic(), 0.1)


def _distinct_free_ports(count: int) -> list[int]:
    # free_port() may hand back a port it returned a moment ago; the cluster bus also uses
    # port + 10000, so keep every data port low enough for that to be a valid port.
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports and port + 10000 <= 65535 and _is_free(port + 10000):
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _pairs(reply: Reply) -> dict[str, str]:
    """A flat ``[name, value, name, value, ...]`` reply (``SENTINEL master``) as a dict."""
    if not isinstance(reply, list):
        return {}
    items = [x.decode() if isinstance(x, bytes) else str(x) for x in reply]
    return dict(zip(items[::2], items[1::2], strict=True))


__all__: Sequence[str] = ["DeploymentError", "RedisClusterServer", "SentinelSet"]
