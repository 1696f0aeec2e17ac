"""Fleet-wide single-flight and fencing, with real processes against a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cachelayer import Cache
from cachelayer.testing import redis_client

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.on_cluster]

WORKER = str(Path(__file__).resolve().parent.parent / "benchmarks" / "fleet_worker.py")
LOAD = 0.05


def spawn(
    url: str,
    ns: str,
    key: str,
    callers: int,
    mode: str,
    start: float,
    load: float,
    lease_ttl: float = 10.0,
) -> subprocess.Popen[str]:
    args = [
        sys.executable,
        WORKER,
        url,
        ns,
        key,
        str(callers),
        mode,
        str(start),
        str(load),
        str(lease_ttl),
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen[str], before: float) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "ready" in line, proc.stderr.read() if proc.stderr else line
    assert time.time() < before, "a worker was not ready in time; the test proves nothing"


def collect(proc: subprocess.Popen[str], timeout: float = 30) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize(("mode", "callers"), [("async", 250), ("threads", 50)])
def test_a_cold_key_is_loaded_once_by_the_whole_fleet(
    redis_url: str, mode: str, callers: int
) -> None:
    start = time.time() + 4.0  # all four connected and subscribed by then, then all at once
    procs = [spawn(redis_url, "fleet", "hot", callers, mode, start, LOAD) for _ in range(4)]
    for p in procs:
        wait_ready(p, before=start)
    results = [collect(p) for p in procs]
    values = [v for r in results for v in r["values"]]
    latencies = [t for r in results for t in r["latency"]]
    assert len(values) == 4 * callers
    assert len(set(values)) == 1, "every caller got the one load's value"
    assert int(redis_client(redis_url).get("fleet:loads") or 0) == 1
    # No polling delay: the last caller is served soon after the single load ends (the
    # benchmark measures it; here only a bound generous enough for a loaded machine).
    assert max(latencies) < LOAD + 0.5, max(latencies)


def test_a_killed_lease_holder_is_replaced_by_exactly_one_other_process(redis_url: str) -> None:
    lease_ttl = 5.0  # outlives the others' start-up, so they must wait for it to expire
    start = time.time() + 2.0
    holder = spawn(redis_url, "kill", "k", 1, "threads", start, 30.0, lease_ttl)
    wait_ready(holder, before=start)
    client = redis_client(redis_url)
    deadline = time.time() + 10
    while int(client.get("kill:loads") or 0) < 1:  # the holder is loading, lease taken
        assert time.time() < deadline
        time.sleep(0.01)
    others_start = time.time() + 3.0
    others = [
        spawn(redis_url, "kill", "k", 50, "async", others_start, LOAD, lease_ttl) for _ in range(2)
    ]
    for p in others:
        wait_ready(p, before=others_start)
    while time.time() < others_start + 0.1:
        time.sleep(0.01)
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate()
    results = [collect(p, timeout=20) for p in others]
    values = [v for r in results for v in r["values"]]
    assert len(values) == 100
    assert len(set(values)) == 1
    assert int(client.get("kill:loads") or 0) == 2  # the dead holder's, and one takeover
    # Nobody hung, and nobody gave up early: all were served once the lease expired.
    latest = max(t for r in results for t in r["latency"])
    assert 0.5 < latest < lease_ttl + LOAD + 1.0


def test_an_invalidation_during_a_slow_load_wins_in_every_tier(redis_url: str) -> None:
    writer = Cache(redis_url, namespace="fence", jitter=0)
    reader = Cache(redis_url, namespace="fence", jitter=0)
    started = threading.Event()

    def slow_old_value() -> str:
        started.set()
        time.sleep(0.3)
        return "old price"

    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(writer.get_or_load("price", slow_old_value)))
    t.start()
    started.wait(5)
    reader.delete("price")  # the price changed while the slow load was reading the old one
    t.join(5)
    assert result == ["old price"]  # the caller that asked before the change gets its answer
    assert writer.stats()["fenced_writes"] == 1
    # ...but the old value is served by nobody afterwards: not from Redis, not from L1.
    assert reader.get("price") is None
    assert writer.get("price") is None
    assert writer.get_or_load("price", lambda: "new price") == "new price"
    assert reader.get("price") == "new price"
    writer.close()
    reader.close()


def test_a_set_during_a_slow_load_is_not_overwritten_by_it(redis_url: str) -> None:
    cache = Cache(redis_url, namespace="fence2", jitter=0)
    other = Cache(redis_url, namespace="fence2", jitter=0)
    started = threading.Event()

    def slow() -> str:
        started.set()
        time.sleep(0.2)
        return "stale"

    t = threading.Thread(target=lambda: cache.get_or_load("k", slow))
    t.start()
    started.wait(5)
    other.set("k", "written")
    t.join(5)
    assert Cache(redis_url, namespace="fence2").get("k") == "written"
    assert cache.get("k") == "written"
    cache.close()
    other.close()
