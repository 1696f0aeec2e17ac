"""The side-by-side table a replay prints, and its JSON form."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

Row = tuple[str, Callable[[dict[str, Any]], str]]


def _int(v: Any) -> str:
    return f"{int(v):,}"


def _ms(v: Any) -> str:
    return f"{float(v):,.1f}"


def _cache(field: str) -> Callable[[dict[str, Any]], str]:
    # "-" where there is no cache, or where this version of the cache does not count it.
    return lambda r: _int(r["cache"][field]) if field in (r["cache"] or {}) else "-"


def _stale(cache: dict[str, Any] | None) -> str:
    counts = [v for k, v in (cache or {}).items() if k.startswith("stale_")]
    return _int(sum(counts)) if counts else "-"


ROWS: list[Row] = [
    ("requests scheduled", lambda r: _int(r["requests"])),
    ("  answered OK", lambda r: _int(r["ok"])),
    ("  failed by injected DB failure", lambda r: _int(r["injected_failures"])),
    ("  failed by overload (HTTP 5xx)", lambda r: _int(r["errors"])),
    ("  client timeouts", lambda r: _int(r["timeouts"])),
    ("  not sent (generator cap)", lambda r: _int(r["dropped"])),
    ("  failed outside brown-out", lambda r: _int(r["failed_outside_brownout"])),
    ("  failed in brown-out", lambda r: _int(r["failed_in_brownout"])),
    ("latency p50 (ms)", lambda r: _ms(r["p50_ms"])),
    ("latency p95 (ms)", lambda r: _ms(r["p95_ms"])),
    ("latency p99 (ms)", lambda r: _ms(r["p99_ms"])),
    ("latency max (ms)", lambda r: _ms(r["max_ms"])),
    ("p99 per phase (ms)", lambda r: ""),
    *[
        (f"  {phase}", (lambda p: lambda r: _ms(r["phases"][p]["p99_ms"]))(phase))
        for phase in ("baseline", "ramp", "surge", "brown-out", "recovery")
    ],
    ("DB queries", lambda r: _int(r["db_queries"])),
    ("DB queries/s, mean", lambda r: _ms(r["db_queries_per_s"])),
    ("DB queries/s, peak (0.5 s)", lambda r: _ms(r["db_peak_queries_per_s"])),
    ("DB time per query, mean (ms)", lambda r: f"{r['db_query_ms_mean']:.2f}"),
    ("DB injected delay, total (s)", lambda r: f"{r['db_injected_delay_s']:.1f}"),
    ("DB injected failures", lambda r: _int(r["db_injected_failures"])),
    ("peak connections in use", lambda r: f"{r['pool_peak_in_use']} of {r['pool_size']}"),
    ("pool wait, total (s)", lambda r: f"{r['pool_wait_total_s']:.1f}"),
    ("pool wait p99 (ms)", lambda r: _ms(r["pool_wait_p99_ms"])),
    ("pool timeouts", lambda r: _int(r["pool_timeouts"])),
    ("cache hits, L1", _cache("l1_hits")),
    ("cache hits, Redis", _cache("l2_hits")),
    ("loader calls", _cache("loads")),
    ("coalesced (single-flight)", _cache("coalesced")),
    ("served stale (all reasons)", lambda r: _stale(r["cache"])),
    ("early refreshes", _cache("early_refreshes")),
    ("loads shed (origin guard)", _cache("loads_shed")),
    ("Redis errors", _cache("backend_errors")),
    ("circuit breaker opened", _cache("breaker_opened")),
    ("max generator lag (ms)", lambda r: _ms(r["max_send_lag_ms"])),
]


def describe(result: dict[str, Any]) -> list[str]:
    """The lines that say what was replayed, so a table never travels without its setup."""
    sc = result["scenario"]
    brown = next(p for p in result["phases"] if p["name"] == "brown-out")
    delay = f"{sc['db_delay'] * 1000:g} ms injected per query" if sc["db_delay"] else "none"
    return [
        f"surge replay: {sc['duration']:g} s per run, {sc['rate']:g} -> "
        f"{sc['rate'] * sc['surge']:g} requests/s ({sc['surge']:g}x, ramp {sc['ramp']:g} s), "
        f"{sc['keys']:,} products (Zipf s={sc['zipf_s']:g}), {sc['sessions']:,} sessions",
        f"database: {result['database']}, pool of {sc['pool_size']} "
        f"(pool timeout {sc['pool_timeout']:g} s), injected latency: {delay}",
        f"cache: {result['cache_tiers']}, TTL {sc['ttl']:g} s, stale TTL {sc['stale_ttl']:g} s"
        + "".join(f", {k}={v}" for k, v in sc.get("cache_options", {}).items()),
        f"app: {result['app']}; client timeout {sc['request_timeout']:g} s",
        f"brown-out {brown['start']:g}-{brown['end']:g} s: connections held "
        f"{brown['slowdown']:g}x longer, {brown['fail_share']:.0%} of queries fail (injected)",
        "latency is measured from each request's scheduled send time (open loop)",
    ]


def table(result: dict[str, Any]) -> str:
    nocache, cached = result["runs"]
    width = max(len(label) for label, _ in ROWS) + 2
    lines = [*describe(result), ""]
    lines.append(f"{'':{width}}{'no cache':>14}{'cachelayer':>14}")
    for label, cell in ROWS:
        lines.append(f"{label:{width}}{cell(nocache):>14}{cell(cached):>14}")
    # Without a cache every request needs one query; the no-cache run's own count is lower
    # only because requests that timed out waiting for a connection never sent theirs.
    saved = cached["requests"] - cached["db_queries"]
    share = saved / cached["requests"] if cached["requests"] else 0.0
    label = "DB queries avoided (vs 1 per request)"
    lines.append(f"{label}{f'{saved:,} ({share:.0%})':>{width + 28 - len(label)}}")
    lines.append(
        f"distinct keys per TTL window (summed): {result['distinct_keys_per_ttl_window']:,}"
    )
    lines.append("")
    lines.append("targets:")
    for t in result["targets"]:
        mark = "met    " if t["met"] else "NOT MET"
        lines.append(f"  [{mark}] {t['run']}: {t['target']}: {t['measured']}")
    return "\n".join(lines)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=False)
