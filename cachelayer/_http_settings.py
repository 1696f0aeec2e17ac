"""The middleware's configuration: global settings and per-route rules, validated once."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from .exceptions import ConfigurationError

Scope = Mapping[str, Any]

# RFC 9110 §15.1: statuses cacheable by default (heuristically), minus 206 (never stored here).
DEFAULT_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})


class Rule:
    """Per-route settings; the first rule whose glob matches the request path applies.

    Args:
        path: an ``fnmatch`` glob over the path the router sees (``*`` also crosses ``/``).
        ttl: seconds to keep responses that carry no explicit freshness of their own.
        cache: False sends matching requests around the cache entirely.
        query_include: if given, only these query parameters are kept; all others are
            removed before the app sees the request (so they cannot change a stored page).
        query_exclude: query parameters removed before the app sees the request.
        stale_while_revalidate, stale_if_error: defaults for responses that do not say.
    """

    __slots__ = (
        "cache",
        "path",
        "query_exclude",
        "query_include",
        "regex",
        "stale_if_error",
        "stale_while_revalidate",
        "ttl",
    )

    def __init__(
        self,
        path: str,
        *,
        ttl: float | None = None,
        cache: bool = True,
        query_include: Iterable[str] | None = None,
        query_exclude: Iterable[str] = (),
        stale_while_revalidate: float | None = None,
        stale_if_error: float | None = None,
    ) -> None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigurationError(f"a rule's path glob starts with '/', got {path!r}")
        self.path = path
        self.regex = re.compile(fnmatch.translate(path))
        self.ttl = _seconds("ttl", ttl)
        self.cache = bool(cache)
        self.query_include = None if query_include is None else frozenset(query_include)
        self.query_exclude = frozenset(query_exclude)
        self.stale_while_revalidate = _seconds("stale_while_revalidate", stale_while_revalidate)
        self.stale_if_error = _seconds("stale_if_error", stale_if_error)

    def __repr__(self) -> str:
        return f"Rule({self.path!r}, ttl={self.ttl}, cache={self.cache})"


def _seconds(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigurationError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


NO_RULE = Rule("/*")


class Settings:
    """Everything the middleware was configured with, validated once."""

    def __init__(
        self,
        *,
        default_ttl: float | None,
        rules: Iterable[Rule],
        private_key: Callable[[Scope], str | None] | None,
        statuses: Collection[int],
        max_body_size: int,
        max_variants: int,
        hit_for_miss_ttl: float,
        stale_while_revalidate: float,
        stale_if_error: float,
        allow_client_no_cache: bool,
        hosts: Iterable[str] | None,
        trusted_forwarded_headers: Iterable[str],
        tags_header: str | None,
        cache_status: str | None,
        prefix: str,
    ) -> None:
        self.default_ttl = _seconds("default_ttl", default_ttl)
        self.rules = tuple(rules)
        if not all(isinstance(r, Rule) for r in self.rules):
            raise ConfigurationError("rules must be cachelayer.asgi.Rule objects")
        if private_key is not None and not callable(private_key):
            raise ConfigurationError("private_key must be a callable: scope -> str | None")
        self.private_key = private_key
        self.statuses = frozenset(statuses)
        if 206 in self.statuses or 304 in self.statuses:
            raise ConfigurationError("206 and 304 responses are never stored")
        for name, n in (("max_body_size", max_body_size), ("max_variants", max_variants)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigurationError(f"{name} must be a positive int, got {n!r}")
        self.max_body_size = max_body_size
        self.max_variants = max_variants
        self.hit_for_miss_ttl = _seconds("hit_for_miss_ttl", hit_for_miss_ttl) or 0.0
        self.swr = _seconds("stale_while_revalidate", stale_while_revalidate) or 0.0
        self.sie = _seconds("stale_if_error", stale_if_error) or 0.0
        self.allow_client_no_cache = bool(allow_client_no_cache)
        self.hosts = None if hosts is None else frozenset(h.lower() for h in hosts)
        self.trusted = tuple(sorted(h.lower().encode("ascii") for h in trusted_forwarded_headers))
        self.tags_header = tags_header.lower().encode("ascii") if tags_header else None
        self.cache_status = cache_status
        if not isinstance(prefix, str) or not prefix or ":" in prefix:
            raise ConfigurationError(
                f"prefix must be a non-empty string without ':', got {prefix!r}"
            )
        self.prefix = prefix
        self.memo: dict[tuple[Any, ...], Any] = {}  # URL -> its key parts (``locate``)
