"""Freshness arithmetic: pure functions over times handed in by the caller's clock."""

from __future__ import annotations

import math
import random
from typing import Any

from ._codec import Entry
from .exceptions import ConfigurationError


def check_seconds(name: str, value: Any, *, allow_zero: bool, allow_none: bool = False) -> Any:
    """Validate a duration argument: a finite, non-negative (or positive) number of seconds."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{name} must be finite and {bound}, got {value!r}")
    return float(value)


def check_jitter(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigurationError(f"jitter must be a fraction in [0, 1), got {value!r}")
    return float(value)


def jittered(ttl: float, jitter: float, rng: random.Random) -> float:
    """Spread ``ttl`` uniformly over ``ttl * (1 ± jitter)`` so keys written together
    do not all expire together (and reload together)."""
    if not jitter:
        return ttl
    return ttl * (1.0 + rng.uniform(-jitter, jitter))


def new_entry(
    value: Any,
    payload: bytes | None,
    *,
    now: float,
    ttl: float,
    stale_ttl: float,
    jitter: float,
    rng: random.Random,
    load_time: float,
    tags: tuple[str, ...],
) -> Entry:
    fresh_until = now + jittered(ttl, jitter, rng)
    return Entry(value, payload, now, fresh_until, fresh_until + stale_ttl, load_time, tags)


# XFetch refreshes with probability exp(-(expiry - now) / (load_time * beta)) per request.
# Further than this many load times from expiry that is below exp(-10) = 0.005%, so the hot
# path answers alone there and only the last stretch pays for the random draw.
XFETCH_SPAN = 10.0


def bound_for_l1(entry: Entry, now: float, l1_ttl: float | None, beta: float = 0.0) -> Entry:
    """Set the in-process copy's bounds, counted from when this process took it."""
    if l1_ttl is None:
        entry.l1_limit, entry.l1_expires = entry.fresh_until, entry.stale_until
    else:
        cap = now + l1_ttl
        entry.l1_limit = min(entry.fresh_until, cap)
        entry.l1_expires = min(entry.stale_until, cap)
    window = entry.fresh_until - XFETCH_SPAN * entry.load_time * beta
    entry.l1_fresh = min(entry.l1_limit, window)
    return entry


def redis_px(entry: Entry, now: float) -> int:
    """Milliseconds Redis keeps the record: to the end of its grace, never longer.

    Rounded down so Redis never outlives the entry; 0 means "already over, do not write".
    """
    return max(0, int((entry.stale_until - now) * 1000))
