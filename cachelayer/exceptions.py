"""The errors cachelayer raises.

Every error derives from :class:`CacheError`, and each also inherits the builtin it resembles,
so code that already catches ``ValueError`` or ``TypeError`` keeps working::

    CacheError(Exception)
    ├── ConfigurationError(CacheError, ValueError)   a bad argument to Cache() or @cached
    ├── InvalidKeyError(CacheError, TypeError)       no stable key can be built from an argument
    ├── SerializationError(CacheError, ValueError)   a value msgpack cannot round-trip exactly
    ├── BackendError(CacheError)                     Redis failed (strict mode only);
    │                                                __cause__ is redis-py's error
    ├── OriginOverloadedError(CacheError)            the origin guard had no slot in time and
    │                                                there was nothing stale to serve
    └── LoadTimeoutError(CacheError, TimeoutError)   a load outran the hard timeout

Exceptions raised by a loader are never wrapped: they reach the caller unchanged and nothing
is cached. Redis trouble fails open (the loader answers, the error is logged and counted)
unless the cache was built with ``strict=True``.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "CacheError",
    "ConfigurationError",
    "InvalidKeyError",
    "LoadTimeoutError",
    "OriginOverloadedError",
    "SerializationError",
]


class CacheError(Exception):
    """The root of every error cachelayer raises."""


class ConfigurationError(CacheError, ValueError):
    """An argument to ``Cache``, ``cached`` or a method is out of range or inconsistent."""


class InvalidKeyError(CacheError, TypeError):
    """A cache key could not be built from a function's arguments.

    Raised rather than falling back to ``repr()``, which would embed memory addresses and make
    keys differ between processes. Pass ``key=`` (a template or a callable) to the decorator.
    """


class SerializationError(CacheError, ValueError):
    """A value cannot be encoded so that it decodes to an equal value of the same type."""

    def __init__(self, message: str, *, key: str | None = None, type_name: str | None = None):
        super().__init__(message)
        self.key = key
        self.type_name = type_name


class BackendError(CacheError):
    """Redis failed and the cache is strict; ``__cause__`` holds redis-py's exception."""


class OriginOverloadedError(CacheError):
    """The origin guard had no free load slot within its wait, and no stale value existed.

    Failing fast is the point: a request that queues forever for a database connection is
    how a surge turns into an outage.
    """


class LoadTimeoutError(CacheError, TimeoutError):
    """A caller waited ``hard_timeout`` seconds for a load and had no stale value to fall back
    on. The load itself goes on and fills the cache for later callers."""
