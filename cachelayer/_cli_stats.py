"""``cachelayer stats``: what Redis holds for a namespace.

    cachelayer stats --redis URL --namespace NS [--sample N] [--json]

Keys by kind (values, leases, fences, waiter flags, tag versions), their memory (``MEMORY
USAGE`` on a bounded sample per kind, scaled up to the count), the server's memory limit and
eviction policy, and the tag versions. It walks the namespace with ``SCAN``: fine for an
operator at a terminal, which is the only place cachelayer ever scans (never a request path).
Bad URLs and unreachable servers give one line on stderr and exit status 1, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# Record kinds by what follows ``<ns>:v1:`` (see ``_keys.RedisKeys``).
_KINDS = (("lease:{", "leases"), ("fence:{", "fences"), ("wait:{", "waits"), ("tag:{", "tags"))
_ORDER = ("values", "leases", "fences", "waits", "tags", "other")
_TIMEOUT = 2.0  # seconds: an operator waits that long for an answer, not forever


def add_stats(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "stats",
        help="show what Redis holds for a namespace: keys, memory, tag versions",
        description=(
            "Count a namespace's records in Redis by kind, estimate their memory from a "
            "sample (MEMORY USAGE), and list tag versions. Read-only; uses SCAN."
        ),
    )
    p.add_argument("--redis", required=True, metavar="URL", help="redis:// URL of the cache")
    p.add_argument("--namespace", required=True, metavar="NS", help="the caches' namespace")
    p.add_argument(
        "--sample",
        type=_positive,
        default=500,
        metavar="N",
        help="keys per kind whose memory is measured (default 500)",
    )
    p.add_argument(
        "--tags", type=_positive, default=20, metavar="N", help="tag versions shown (default 20)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=run_stats)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def kind_of(rest: str) -> str:
    """The kind of a record from its key with the namespace prefix removed."""
    if rest.startswith("{"):
        return "values"
    for prefix, kind in _KINDS:
        if rest.startswith(prefix):
            return kind
    return "other"


def run_stats(args: argparse.Namespace) -> int:
    import redis

    from ._keys import RedisKeys
    from .exceptions import ConfigurationError

    try:
        keys = RedisKeys(_namespace(args.namespace))
        client = redis.Redis.from_url(
            args.redis, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT
        )
    except (ValueError, ConfigurationError) as exc:
        print(f"cachelayer stats: error: {exc}", file=sys.stderr)
        return 1
    try:
        with client:
            report = collect(client, keys.prefix, args.sample, args.tags)
    except (redis.RedisError, OSError) as exc:
        where = _where(client)
        print(f"cachelayer stats: error: cannot read Redis at {where}: {exc}", file=sys.stderr)
        return 1
    report["namespace"] = args.namespace
    report["server"]["address"] = _where(client)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render(report))
    return 0


def _namespace(text: str) -> str:
    from ._keys import validate_namespace

    return validate_namespace(text)


def _where(client: Any) -> str:
    # Host, port and db only: a URL may carry a password, which must not reach a terminal log.
    kw = client.get_connection_kwargs()
    if kw.get("path"):
        return f"unix:{kw['path']} db {kw.get('db', 0)}"
    return f"{kw.get('host', '?')}:{kw.get('port', '?')} db {kw.get('db', 0)}"


def collect(client: Any, prefix: str, sample: int, max_tags: int) -> dict[str, Any]:
    """Counts, sampled memory and tag versions under ``prefix`` (``<ns>:v1:``)."""
    counts = dict.fromkeys(_ORDER, 0)
    sampled: dict[str, list[bytes]] = {kind: [] for kind in _ORDER}
    tag_keys: list[bytes] = []
    cut = len(prefix.encode())
    for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
        kind = kind_of(key[cut:].decode("utf-8", "replace"))
        counts[kind] += 1
        if len(sampled[kind]) < sample:
            sampled[kind].append(key)
        if kind == "tags":
            tag_keys.append(key)
    kinds: dict[str, dict[str, Any]] = {}
    for kind in _ORDER:
        sizes = _memory(client, sampled[kind])
        mean = sum(sizes) / len(sizes) if sizes else 0.0
        kinds[kind] = {
            "keys": counts[kind],
            "sampled": len(sizes),
            "mean_bytes": round(mean),
            "estimated_bytes": round(mean * counts[kind]),
        }
    return {
        "kinds": kinds,
        "keys": sum(counts.values()),
        "estimated_bytes": sum(k["estimated_bytes"] for k in kinds.values()),
        "tag_versions": _tag_versions(client, tag_keys, cut, max_tags),
        "server": _server(client),
    }


def _glob_escape(text: str) -> str:
    # A namespace may hold glob characters (``*``, ``?``, ``[``); SCAN must match them literally.
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _memory(client: Any, keys: list[bytes]) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    # A key may expire between SCAN and MEMORY USAGE: None, left out.
    return [size for size in pipe.execute() if size is not None] if keys else []


def _tag_versions(client: Any, keys: list[bytes], cut: int, limit: int) -> dict[str, Any]:
    """The highest tag versions (most invalidated tags first), ``limit`` of them."""
    versions: list[tuple[int, str]] = []
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        pipe = client.pipeline(transaction=False)
        for key in chunk:  # GETs, not MGET: tags live in different Cluster slots
            pipe.get(key)
        for key, raw in zip(chunk, pipe.execute(), strict=True):
            if raw is None:
                continue
            name = key[cut:].decode("utf-8", "replace").removeprefix("tag:{").removesuffix("}")
            try:
                versions.append((int(raw), name))
            except ValueError:
                versions.append((-1, name))  # not ours, or corrupt: shown as -1
    versions.sort(key=lambda v: (-v[0], v[1]))
    return {
        "count": len(versions),
        "shown": {name: version for version, name in versions[:limit]},
    }


def _server(client: Any) -> dict[str, Any]:
    info = client.info("memory")
    return {
        "used_memory": int(info.get("used_memory", 0)),
        "maxmemory": int(info.get("maxmemory", 0)),
        "maxmemory_policy": str(info.get("maxmemory_policy", "?")),
    }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


def render(report: dict[str, Any]) -> str:
    server = report["server"]
    lines = [
        f"namespace {report['namespace']!r} at {server['address']}: {report['keys']} keys, "
        f"about {_bytes(report['estimated_bytes'])}",
        "",
        f"{'kind':<8} {'keys':>10} {'sampled':>8} {'mean':>10} {'estimated':>12}",
    ]
    for kind, row in report["kinds"].items():
        if row["keys"] or kind != "other":
            lines.append(
                f"{kind:<8} {row['keys']:>10} {row['sampled']:>8} "
                f"{_bytes(row['mean_bytes']):>10} {_bytes(row['estimated_bytes']):>12}"
            )
    limit = server["maxmemory"]
    lines += [
        "",
        f"server: {_bytes(server['used_memory'])} used, maxmemory "
        f"{_bytes(limit) if limit else 'unlimited'}, policy {server['maxmemory_policy']}",
    ]
    if server["maxmemory_policy"] == "noeviction":
        lines.append(
            "  note: with noeviction a full Redis refuses every cache write; use "
            "volatile-lru (docs/operations/redis-sizing.md)"
        )
    tags = report["tag_versions"]
    lines += ["", f"tag versions ({len(tags['shown'])} of {tags['count']}, highest first):"]
    lines += [f"  {name} = {version}" for name, version in tags["shown"].items()]
    return "\n".join(lines)
