"""Turning what one run recorded into the figures the replay reports.

Latency is measured from each request's *scheduled* send time, not from when the generator
got round to sending it, so a generator that falls behind cannot hide the delay it caused
(the correction for coordinated omission). A request that timed out counts with the time the
client waited, which understates it: the table says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from .scenario import Arrival, Phase

BUCKET = 0.5  # seconds per point of the timeline

OK, ERROR, TIMEOUT, DROPPED = "ok", "error", "timeout", "dropped"
INJECTED = "injected"  # failed by the brown-out's injected query failures


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; 0.0 when empty.

    Nearest-rank always returns a value that was measured, never an interpolation between
    two: a p99 of 2.0 s means some request really took 2.0 s.
    """
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclasses.dataclass
class RequestLog:
    """One entry per scheduled request, in schedule order."""

    latency: list[float] = dataclasses.field(default_factory=list)
    outcome: list[str] = dataclasses.field(default_factory=list)
    send_lag: list[float] = dataclasses.field(default_factory=list)


def _bucketed(times: Sequence[float], duration: float) -> list[int]:
    counts = [0] * max(1, math.ceil(duration / BUCKET))
    for t in times:
        counts[min(len(counts) - 1, max(0, int(t // BUCKET)))] += 1
    return counts


def timeline(
    arrivals: Sequence[Arrival], log: RequestLog, query_times: Sequence[float], span: float
) -> list[dict[str, float | None]]:
    """Per ``BUCKET``: requests scheduled and answered OK, DB queries started, and the p99 of
    the requests scheduled in it (None where none were). ``span`` covers the run and the
    tail after it, when queued requests still reach the database."""
    n = max(1, math.ceil(span / BUCKET))
    latencies: list[list[float]] = [[] for _ in range(n)]
    answered = [0] * n
    for a, lat, out in zip(arrivals, log.latency, log.outcome, strict=True):
        i = min(n - 1, int(a.at // BUCKET))
        latencies[i].append(lat)
        answered[i] += out == OK
    queries = _bucketed(query_times, span)
    return [
        {
            "t": round(i * BUCKET, 3),
            "requests_per_s": len(latencies[i]) / BUCKET,
            "ok_per_s": answered[i] / BUCKET,
            "db_queries_per_s": queries[i] / BUCKET,
            "p99_ms": percentile(latencies[i], 99) * 1000 if latencies[i] else None,
        }
        for i in range(n)
    ]


def summarize(
    name: str,
    arrivals: Sequence[Arrival],
    log: RequestLog,
    app_metrics: dict[str, Any],
    phases: Sequence[Phase],
    duration: float,
    tail: float,
) -> dict[str, Any]:
    """Everything one run reports, as plain JSON-ready values (seconds become ms).

    ``tail`` is how long after the schedule's end requests may still be in flight (their
    queries are counted and charted where they happened, not folded into the last instant).
    """
    pool = app_metrics["pool"]
    lat = log.latency
    brownout = [p for p in phases if p.fail_share or p.slowdown != 1.0]
    # A request is the brown-out's if it was in flight at any moment of it: one sent just
    # before the database degraded can still be failed by it.
    in_brownout = [
        any(a.at < p.end and a.at + latency >= p.start for p in brownout)
        for a, latency in zip(arrivals, lat, strict=True)
    ]
    failed = [out != OK for out in log.outcome]
    queries = int(pool["queries"])
    per_phase = {}
    for phase in phases:
        idx = [i for i, a in enumerate(arrivals) if phase.start <= a.at < phase.end]
        per_phase[phase.name] = {
            "requests": len(idx),
            "failed": sum(failed[i] for i in idx),
            "p99_ms": percentile([lat[i] for i in idx], 99) * 1000,
        }
    waits = pool["waits"]
    cache = app_metrics.get("cache") or {}
    return {
        "name": name,
        "requests": len(arrivals),
        "ok": log.outcome.count(OK),
        "errors": log.outcome.count(ERROR),
        "injected_failures": log.outcome.count(INJECTED),
        "timeouts": log.outcome.count(TIMEOUT),
        "dropped": log.outcome.count(DROPPED),
        "failed_in_brownout": sum(f and b for f, b in zip(failed, in_brownout, strict=True)),
        "failed_outside_brownout": sum(
            f and not b for f, b in zip(failed, in_brownout, strict=True)
        ),
        "p50_ms": percentile(lat, 50) * 1000,
        "p95_ms": percentile(lat, 95) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": max(lat, default=0.0) * 1000,
        "max_send_lag_ms": max(log.send_lag, default=0.0) * 1000,
        "db_queries": queries,
        "db_queries_per_s": queries / duration,
        "db_peak_queries_per_s": max(_bucketed(pool["query_times"], duration + tail)) / BUCKET,
        "db_query_ms_mean": 1000 * pool["query_seconds"] / queries if queries else 0.0,
        "db_injected_delay_s": pool["injected_seconds"],
        "db_injected_failures": pool["injected_failures"],
        "db_errors": pool["database_errors"],
        "pool_size": app_metrics["pool_size"],
        "pool_peak_in_use": pool["peak_in_use"],
        "pool_wait_total_s": sum(waits),
        "pool_wait_p99_ms": percentile(waits, 99) * 1000,
        "pool_timeouts": pool["pool_timeouts"],
        "cache": cache,
        "phases": per_phase,
        "timeline": timeline(arrivals, log, pool["query_times"], duration + tail),
    }


def targets(
    nocache: dict[str, Any], cached: dict[str, Any], key_floor: int
) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure and whether it was met."""
    base_p99 = nocache["phases"]["baseline"]["p99_ms"]
    surge_p99 = nocache["phases"]["surge"]["p99_ms"]
    no_failed = nocache["requests"] - nocache["ok"]
    c_failed = cached["requests"] - cached["ok"]
    return [
        {
            "run": "no cache",
            "target": "pool saturated (peak connections in use = pool size)",
            "measured": f"{nocache['pool_peak_in_use']} of {nocache['pool_size']}",
            "met": nocache["pool_peak_in_use"] >= nocache["pool_size"],
        },
        {
            "run": "no cache",
            "target": "p99 rises in the surge (surge p99 >= 5x baseline p99)",
            "measured": f"{surge_p99:.0f} ms vs {base_p99:.0f} ms",
            "met": surge_p99 >= 5 * base_p99,
        },
        {
            "run": "no cache",
            "target": "requests fail or time out",
            "measured": f"{no_failed} failed",
            "met": no_failed > 0,
        },
        {
            "run": "cachelayer",
            "target": "DB queries <= 1.1 x distinct keys per TTL window",
            "measured": f"{cached['db_queries']} vs 1.1 x {key_floor} = {1.1 * key_floor:.0f}",
            "met": cached["db_queries"] <= 1.1 * key_floor,
        },
        {
            "run": "cachelayer",
            "target": "zero errors (brown-out included)",
            "measured": f"{c_failed} failed ({cached['failed_in_brownout']} in brown-out)",
            "met": c_failed == 0,
        },
        {
            "run": "cachelayer",
            "target": "p99 <= 1/10 of the no-cache p99",
            "measured": f"{cached['p99_ms']:.1f} ms vs {nocache['p99_ms'] / 10:.1f} ms",
            "met": cached["p99_ms"] <= nocache["p99_ms"] / 10,
        },
    ]
