"""The surge replay: its pure parts (schedule, sampler, percentiles, table, CLI errors), its
pool under cancellation, and short replays against SQLite and against PostgreSQL + Redis.

Replays assert the direction of the result (the cached run sends fewer queries to the
database and fails only where the brown-out injects failures), never absolute times: the
machine running the tests is shared and its speed is not ours to assert.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from cachelayer import cli
from cachelayer.surge import db, replay
from cachelayer.surge.metrics import RequestLog, percentile, summarize, targets
from cachelayer.surge.pool import Pool, PoolTimeoutError
from cachelayer.surge.report import table
from cachelayer.surge.scenario import (
    Arrival,
    Scenario,
    ScenarioError,
    SurgeError,
    ZipfSampler,
    distinct_keys_per_window,
    schedule,
)
from cachelayer.surge.wire import WireError, _parse_head
from cachelayer.testing import free_port

# Small enough to replay in a few seconds, big enough that the surge overloads a pool of 2.
SHORT = {"duration": 3.0, "rate": 25.0, "keys": 200, "sessions": 50, "reviews": 40, "ttl": 1.0}


# --- schedule and sampler ---------------------------------------------------------------


def test_schedule_ramps_from_baseline_to_the_surge() -> None:
    sc = Scenario(duration=20.0, rate=50.0, surge=10.0, ramp=2.0)
    arrivals = schedule(sc)
    base, _ramp, surge, *_ = sc.phases()
    in_base = sum(base.start <= a.at < base.end for a in arrivals) / (base.end - base.start)
    in_surge = sum(surge.start <= a.at < surge.end for a in arrivals) / (surge.end - surge.start)
    assert 40 < in_base < 60
    assert 8 < in_surge / in_base < 12
    assert all(0 <= a.at < sc.duration for a in arrivals)
    assert [a.at for a in arrivals] == sorted(a.at for a in arrivals)


def test_schedule_is_the_same_for_the_same_seed_and_differs_otherwise() -> None:
    sc = Scenario(**SHORT)
    assert schedule(sc) == schedule(sc)
    assert schedule(sc) != schedule(Scenario(**{**SHORT, "seed": 2}))


def test_schedule_mixes_catalog_and_session_requests() -> None:
    sc = Scenario(**SHORT)
    kinds = [a.kind for a in schedule(sc)]
    assert {"product", "category", "cart"} == set(kinds)
    assert kinds.count("product") > kinds.count("cart")
    carts = [a for a in schedule(sc) if a.kind == "cart"]
    assert all(1 <= a.ident <= sc.sessions and a.path == "/cart" for a in carts)


def test_phases_cover_the_run_and_only_the_brownout_degrades_the_database() -> None:
    sc = Scenario()
    phases = sc.phases()
    assert [p.name for p in phases] == ["baseline", "ramp", "surge", "brown-out", "recovery"]
    assert phases[0].start == 0 and phases[-1].end == sc.duration
    assert all(a.end == b.start for a, b in itertools.pairwise(phases))
    degraded = [p.name for p in phases if p.slowdown != 1 or p.fail_share]
    assert degraded == ["brown-out"]


def test_zipf_sampler_favours_the_first_ranks_as_the_law_says() -> None:
    sampler = ZipfSampler(1000, 1.1, random.Random(7))
    draws = [sampler() for _ in range(20_000)]
    assert all(1 <= d <= 1000 for d in draws)
    expected = sampler.probability(1)
    assert abs(draws.count(1) / len(draws) - expected) < 0.02
    assert draws.count(1) > draws.count(2) > draws.count(10)
    assert sum(sampler.probability(r) for r in range(1, 1001)) == pytest.approx(1.0)


def test_distinct_keys_are_counted_once_per_ttl_window() -> None:
    arrivals = [
        Arrival(0.1, "product", 1),
        Arrival(0.2, "product", 1),
        Arrival(0.3, "cart", 1),
        Arrival(1.5, "product", 1),
    ]
    assert distinct_keys_per_window(arrivals, ttl=1.0) == 3
    assert distinct_keys_per_window(arrivals, ttl=10.0) == 2


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"pool_size": 0}, "pool size"),
        ({"duration": -1.0}, "duration"),
        ({"rate": 0.0}, "rate"),
        ({"ttl": 0.0}, "ttl"),
        ({"cart_share": 0.8, "category_share": 0.5}, "at most 1"),
        ({"rate": 5000.0, "surge": 10.0}, "peak rate"),
    ],
)
def test_scenario_rejects_settings_it_cannot_honestly_run(
    change: dict[str, Any], words: str
) -> None:
    with pytest.raises(ScenarioError, match=words):
        Scenario(**change)


# --- figures -----------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 99) == 0.0
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, 0)


def fake_result() -> dict[str, Any]:
    """A replay result built from made-up logs: the table must show what they say."""
    sc = Scenario(**SHORT)
    arrivals = schedule(sc)
    n = len(arrivals)
    runs = []
    for name, latency, queries in (("no cache", 0.9, n), ("cachelayer", 0.002, n // 4)):
        log = RequestLog([latency] * n, ["ok"] * (n - 3) + ["timeout"] * 3, [0.0] * n)
        pool = {
            "queries": queries,
            "query_seconds": queries * 0.002,
            "injected_seconds": 0.0,
            "injected_failures": 0,
            "database_errors": 0,
            "pool_timeouts": 0,
            "peak_in_use": 10,
            "waits": [0.001] * queries,
            "query_times": [a.at for a in arrivals[:queries]],
        }
        cache = {"l1_hits": n - queries, "l2_hits": 0, "loads": queries, "coalesced": 1}
        metrics = {"pool": pool, "pool_size": 10, "cache": cache if queries < n else None}
        runs.append(summarize(name, arrivals, log, metrics, sc.phases(), sc.duration, 1.0))
    floor = distinct_keys_per_window(arrivals, sc.ttl)
    return {
        "scenario": sc.__dict__,
        "phases": [p.__dict__ for p in sc.phases()],
        "database": "SQLite",
        "cache_tiers": "L1 only",
        "app": "in process (ASGI)",
        "distinct_keys_per_ttl_window": floor,
        "runs": runs,
        "targets": targets(runs[0], runs[1], floor),
    }


def test_table_puts_both_runs_side_by_side_with_the_targets() -> None:
    text = table(fake_result())
    header = next(line for line in text.splitlines() if "no cache" in line and "cachelayer" in line)
    assert header.split() == ["no", "cache", "cachelayer"]
    assert "latency p99 (ms)" in text and "900.0" in text and "2.0" in text
    assert "DB queries avoided" in text and "(75%)" in text
    assert "[NOT MET] cachelayer: zero errors" in text
    assert "[met    ] cachelayer: p99 <= 1/10" in text
    assert "open loop" in text


# --- the pool and the wire ---------------------------------------------------------------


def test_pool_times_out_waiters_and_gets_connections_back_from_abandoned_queries() -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def execute(conn: str, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
            await release.wait()
            return [(conn,)]

        pool: Pool[str] = Pool(["c1"], execute, timeout=0.05)
        holder = asyncio.ensure_future(pool.fetch("q"))
        await asyncio.sleep(0)
        with pytest.raises(PoolTimeoutError):
            await pool.fetch("q")
        holder.cancel()  # the caller gives up; the query still holds the connection
        await asyncio.sleep(0.01)
        assert pool.metrics.in_use == 1
        release.set()
        assert await pool.fetch("q") == [("c1",)]
        assert pool.metrics.pool_timeouts == 1 and pool.metrics.peak_in_use == 1
        assert await pool.drain(timeout=1) == ["c1"]

    asyncio.run(scenario())


def test_wire_reads_status_and_length_and_refuses_what_it_cannot_read() -> None:
    head = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 12\r\nconnection: close\r\n\r\n"
    assert _parse_head(head) == (503, 12, False)
    with pytest.raises(WireError):
        _parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")


# --- the command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pool-size", "0"], "pool size must be at least 1"),
        (["--duration", "-5"], "duration must be greater than 0"),
        (["--rate", "fast"], "must be a number"),
    ],
)
def test_cli_rejects_bad_numbers_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["surge", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--database-url", "mysql://127.0.0.1/shop"], "malformed database URL"),
        (["--database-url", "postgresql://127.0.0.1:99999/x"], "malformed PostgreSQL URL"),
        (["--database-url", "postgresql://db.example.com/shop"], "only targets this machine"),
        (["--redis-url", "http://127.0.0.1:6379"], "malformed Redis URL"),
        (["--redis-url", "redis+cluster://"], "malformed Redis URL"),
        (["--redis-url", "redis+cluster://127.0.0.1:7000,cache.example.com:7001"], "refusing"),
        (["--redis-url", "redis+sentinel://127.0.0.1:26379"], "malformed Redis URL"),
    ],
)
def test_cli_rejects_bad_urls_before_replaying(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["surge", *argv]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cache_options_are_read_as_json_where_they_can_be() -> None:
    assert cli.cache_option("origin_limit=8") == ("origin_limit", 8)
    assert cli.cache_option("max_stale=null") == ("max_stale", None)
    assert cli.cache_option("namespace=shop") == ("namespace", "shop")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        cli.cache_option("origin_limit")


def test_cli_refuses_cache_options_the_cache_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["surge", "--cache-option", "no_such_option=1"]) == 1
    err = capsys.readouterr().err
    assert "refused its options" in err and "Traceback" not in err


def test_cli_reports_unreachable_servers(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    assert cli.main(["surge", "--redis-url", f"redis://127.0.0.1:{port}/0"]) == 1
    assert "cannot reach Redis" in capsys.readouterr().err
    assert cli.main(["surge", "--database-url", f"postgresql://u@127.0.0.1:{port}/x"]) == 1
    assert "cannot connect to PostgreSQL" in capsys.readouterr().err


def test_import_cachelayer_leaves_the_surge_replay_alone() -> None:
    code = (
        "import sys, cachelayer, cachelayer.cli\n"
        "loaded = [m for m in ('cachelayer.surge', 'starlette', 'httpx') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- replays -----------------------------------------------------------------------------


def assert_cache_helped(result: dict[str, Any]) -> None:
    nocache, cached = result["runs"]
    assert nocache["requests"] == cached["requests"] > 0
    assert cached["db_queries"] < nocache["db_queries"]
    # Outside the brown-out's injected query failures the cached run answers everything.
    assert cached["errors"] == cached["timeouts"] == cached["dropped"] == 0
    assert cached["cache"]["l1_hits"] > 0
    assert not nocache["cache"]


@pytest.mark.slow
def test_replay_against_sqlite_saves_queries_and_leaves_nothing_behind(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "shop.db"
    url = f"sqlite:///{path}"
    code = cli.main(["surge", "--database-url", url, "--duration", "3", "--rate", "25"])
    out = capsys.readouterr().out
    assert code == 0
    assert "no cache" in out and "cachelayer" in out and "targets:" in out
    import sqlite3

    with sqlite3.connect(path) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    conn.close()
    assert tables == []


@pytest.mark.slow
def test_short_replay_direction_in_process() -> None:
    result = replay.run(Scenario(**SHORT, pool_size=2))
    assert_cache_helped(result)
    assert result["runs"][0]["pool_peak_in_use"] == 2


@pytest.mark.slow
def test_short_replay_served_by_uvicorn_stops_its_server() -> None:
    pytest.importorskip("uvicorn")
    result = replay.run(Scenario(**SHORT, pool_size=2), serve=True)
    assert_cache_helped(result)
    assert "uvicorn" in result["app"]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.on_cluster
def test_replay_against_postgresql_and_redis(database_url: str, redis_url: str) -> None:
    result = replay.run(
        Scenario(**SHORT, pool_size=2), database_url=database_url, redis_url=redis_url
    )
    assert_cache_helped(result)
    assert result["cache_tiers"] == replay.tiers(redis_url)
    assert result["cache_tiers"].startswith("L1 + Redis")
    assert result["runs"][1]["cache"]["backend_errors"] == 0
    assert leftover_tables(database_url, result["table_prefix"]) == []


def leftover_tables(url: str, prefix: str) -> list[str]:
    async def query() -> list[str]:
        conn = await db._pg_connect(url)
        try:
            rows = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE starts_with(tablename, $1)", prefix
            )
            return [r[0] for r in rows]
        finally:
            await conn.close()

    return asyncio.run(query())


def test_surge_error_messages_are_for_people() -> None:
    with pytest.raises(SurgeError, match="sqlite:///path"):
        db.parse_database_url("sqlite://")
    assert db.parse_database_url(None) == ("sqlite", "")
    assert db.parse_database_url("postgresql:///test?host=/var/run/postgresql")[0] == "postgresql"


def test_a_load_the_origin_guard_sheds_is_a_503_not_a_crash() -> None:
    import httpx

    from cachelayer import Cache
    from cachelayer.surge.app import build_app

    class SlowShop:  # the database side only; the cache and the app are the real ones
        async def product(self, product_id: int) -> dict[str, int]:
            await asyncio.sleep(0.3)
            return {"id": product_id}

        async def category(self, category_id: int) -> None:
            return None

        async def cart(self, session: str) -> None:
            return None

    async def main() -> list[int]:
        cache = Cache(None, namespace="shed", origin_limit=1, origin_wait=0.05)
        app = build_app(SlowShop(), cache)  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.local") as c:
            replies = await asyncio.gather(c.get("/products/1"), c.get("/products/2"))
        return sorted(r.status_code for r in replies)

    assert asyncio.run(main()) == [200, 503]
