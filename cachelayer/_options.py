"""Per-call settings, and the validation every entry point shares."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from ._policy import check_seconds
from .exceptions import ConfigurationError, InvalidKeyError

T = TypeVar("T")


def check_tags(tags: Any) -> tuple[str, ...]:
    if isinstance(tags, str) or not isinstance(tags, (tuple, list, set, frozenset)):
        raise ConfigurationError(f"tags must be a tuple of strings, got {tags!r}")
    if not all(isinstance(t, str) and t for t in tags):
        raise ConfigurationError(f"every tag must be a non-empty string, got {tags!r}")
    return tuple(tags)


def check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_key(key: Any) -> str:
    if type(key) is not str:
        raise InvalidKeyError(f"cache keys are strings, got {type(key).__name__}: {key!r}")
    return key


class Options:
    """What a read-through does with a key: resolved once per decorator, or per direct call."""

    __slots__ = ("cache_none", "hard_timeout", "lease", "soft_timeout", "stale_ttl", "tags", "ttl")

    def __init__(
        self,
        ttl: float,
        stale_ttl: float,
        tags: tuple[str, ...],
        cache_none: bool,
        lease: bool = True,
        soft_timeout: float | None = None,
        hard_timeout: float | None = None,
    ) -> None:
        self.ttl = ttl
        self.stale_ttl = stale_ttl
        self.tags = tags
        self.cache_none = cache_none
        self.lease = lease
        self.soft_timeout = soft_timeout
        self.hard_timeout = hard_timeout

    def merged(self, **changes: Any) -> Options:
        """A copy with the given fields validated and replaced (None keeps a field)."""
        out = Options(
            self.ttl,
            self.stale_ttl,
            self.tags,
            self.cache_none,
            self.lease,
            self.soft_timeout,
            self.hard_timeout,
        )
        for name, value in changes.items():
            if value is None:
                continue
            if name == "ttl":
                value = check_seconds("ttl", value, allow_zero=False)
            elif name in ("stale_ttl", "soft_timeout", "hard_timeout"):
                value = check_seconds(name, value, allow_zero=name == "stale_ttl")
            elif name == "tags":
                value = check_tags(value)
            elif name in ("cache_none", "lease"):
                value = bool(value)
            else:  # pragma: no cover - internal misuse
                raise TypeError(name)
            setattr(out, name, value)
        if (
            out.soft_timeout is not None
            and out.hard_timeout is not None
            and out.soft_timeout > out.hard_timeout
        ):
            raise ConfigurationError(
                f"soft_timeout ({out.soft_timeout}) must not exceed "
                f"hard_timeout ({out.hard_timeout})"
            )
        return out


class Loaded(Generic[T]):
    """What a loader returns when the loaded value itself decides how it is cached.

    ``return Loaded(page, ttl=max_age)`` stores ``page`` for ``max_age`` seconds;
    ``Loaded(value, store=False)`` hands ``value`` to every waiting caller without storing it.
    Fields left as None keep the call's or decorator's settings. Callers receive ``value``,
    never the wrapper.
    """

    __slots__ = ("stale_ttl", "store", "tags", "ttl", "value")

    def __init__(
        self,
        value: T,
        *,
        ttl: float | None = None,
        stale_ttl: float | None = None,
        tags: Iterable[str] | None = None,
        store: bool = True,
    ) -> None:
        self.value = value
        self.ttl = check_seconds("ttl", ttl, allow_zero=False, allow_none=True)
        self.stale_ttl = check_seconds("stale_ttl", stale_ttl, allow_zero=True, allow_none=True)
        self.tags = None if tags is None else check_tags(tags)
        self.store = bool(store)

    def __repr__(self) -> str:
        return f"Loaded({self.value!r}, ttl={self.ttl}, stale_ttl={self.stale_ttl})"

    def apply(self, opts: Options) -> Options:
        return opts.merged(ttl=self.ttl, stale_ttl=self.stale_ttl, tags=self.tags)
