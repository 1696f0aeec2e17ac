"""``@cache.cached``: read-through caching of a function's results, sync or async.

The wrapper is built once per function so the hit path is as short as Python allows: build
the key, one ``dict.get`` on L1, one clock read, return. No lock, no generator, no task, no
per-call allocation beyond the key string. Everything else (L2, single-flight, the loader) is
behind ``Cache._load_sync`` / ``Cache._load_async``, which only a miss reaches.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._codec import decode_value
from ._keys import key_builder
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._cache import Cache
    from ._options import Options

_MEMO_SIZE = 4096  # argument -> key strings remembered per function; cleared when full
_MEMO_TYPES = frozenset({int, str})


def cached(
    cache: Cache, opts: Options, key: str | Callable[..., str] | None
) -> Callable[[Callable[..., Any]], Any]:
    """Decorate a function or coroutine function so its results are cached in ``cache``.

    ``key`` is None (the function's qualified name and its bound arguments, so ``f(1)``,
    ``f(x=1)`` and a defaulted call agree), a template filled from the arguments such as
    ``"product:{product_id}"``, or a callable taking the function's arguments. The wrapper
    keeps the function's name and signature and gains ``.key(*args, **kwargs)``,
    ``.invalidate(*args, **kwargs)`` and ``.ainvalidate(*args, **kwargs)``.
    """

    def decorate(fn: Callable[..., Any]) -> Any:
        if not callable(fn):
            raise ConfigurationError(f"@cached decorates functions, not {fn!r}")
        plan = key_builder(fn, key)
        make_key = plan.make
        nargs = plan.memo_nargs  # -1 never matches len(args): then the memo is never used
        # The memo hands back the same str object for the same argument, so neither building
        # nor hashing the key is paid again (a str caches its hash). Exact int and str only:
        # 1, 1.0 and True are equal dict keys but must not share a cache key.
        memo: dict[int | str, str] = {}

        def remember(args: tuple[Any, ...]) -> str:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            k = memo[args[-1]] = make_key(args, {})
            return k

        is_async = inspect.iscoroutinefunction(fn)
        clients = cache._clients
        if clients.enabled and not (clients.has_async if is_async else clients.has_sync):
            kind = "async" if is_async else "sync"
            raise ConfigurationError(
                f"{fn.__qualname__} is {kind} but the cache's Redis client is not; "
                "give the Cache a URL (it then makes both kinds of client) or a matching client"
            )
        options_for = _per_call(fn, opts, "tags", opts.tags)
        data = cache._l1.data
        clock = cache._clock
        stats = cache._stats
        load_sync = cache._load_sync
        load_async = cache._load_async
        shared = not cache._copy
        wrapper: Any

        if is_async:

            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                if not kwargs and len(args) == nargs and type(args[-1]) in _MEMO_TYPES:
                    k = memo.get(args[-1])
                    if k is None:
                        k = remember(args)
                else:
                    k = make_key(args, kwargs)
                entry = data.get(k)
                if entry is not None and clock() < entry.l1_fresh:
                    entry.visited = True
                    stats.l1_hits += 1
                    return entry.value if shared else decode_value(entry.payload)  # type: ignore[arg-type]
                call = functools.partial(fn, *args, **kwargs)
                return await load_async(k, call, options_for(args, kwargs))

        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if not kwargs and len(args) == nargs and type(args[-1]) in _MEMO_TYPES:
                    k = memo.get(args[-1])
                    if k is None:
                        k = remember(args)
                else:
                    k = make_key(args, kwargs)
                entry = data.get(k)
                if entry is not None and clock() < entry.l1_fresh:
                    entry.visited = True
                    stats.l1_hits += 1
                    return entry.value if shared else decode_value(entry.payload)  # type: ignore[arg-type]
                return load_sync(
                    k, functools.partial(fn, *args, **kwargs), options_for(args, kwargs)
                )

        functools.update_wrapper(wrapper, fn)

        def key_of(*args: Any, **kwargs: Any) -> str:
            return make_key(args, kwargs)

        def invalidate(*args: Any, **kwargs: Any) -> None:
            cache.delete(make_key(args, kwargs))

        async def ainvalidate(*args: Any, **kwargs: Any) -> None:
            await cache.adelete(make_key(args, kwargs))

        wrapper.key = key_of
        wrapper.invalidate = invalidate
        wrapper.ainvalidate = ainvalidate
        wrapper.cache = cache
        return wrapper

    return decorate


def _templates(fn: Callable[..., Any], what: str, templates: Any) -> list[Any]:
    """Compile each entry of ``templates``: a str with fields is filled from the call's
    arguments; anything else is used as it is."""
    if isinstance(templates, str):
        raise ConfigurationError(f"{what} must be a sequence of strings, not a str: {templates!r}")
    out: list[Any] = []
    for t in templates:
        if not isinstance(t, str):
            raise ConfigurationError(f"every one of {what} must be a string, got {t!r}")
        out.append(key_builder(fn, t).make if "{" in t else t)
    return out


def _fill(parts: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    return [p if isinstance(p, str) else p(args, kwargs) for p in parts]


def _per_call(
    fn: Callable[..., Any], opts: Options, what: str, templates: tuple[str, ...]
) -> Callable[[tuple[Any, ...], dict[str, Any]], Options]:
    """Options for one call: the decorator's, with templated tags filled in (miss path
    only, and only when a tag is a template)."""
    parts = _templates(fn, what, templates)
    if all(isinstance(p, str) for p in parts):
        return lambda args, kwargs: opts
    return lambda args, kwargs: opts.merged(tags=_fill(parts, args, kwargs))


def invalidates(
    cache: Cache, keys: Iterable[str] = (), tags: Iterable[str] = (), expire: Iterable[str] = ()
) -> Callable[[Callable[..., Any]], Any]:
    """Decorate a function that writes: once it returns without raising, ``keys`` are
    deleted, ``expire`` marked stale and ``tags`` invalidated, each a template filled from
    the call's arguments (``"product:{product_id}"``). If it raises, nothing is invalidated.
    Inside ``cache.invalidation_batch()`` the invalidations join the batch."""

    def decorate(fn: Callable[..., Any]) -> Any:
        key_parts = _templates(fn, "keys", tuple(keys))
        tag_parts = _templates(fn, "tags", tuple(tags))
        expire_parts = _templates(fn, "expire", tuple(expire))

        def targets(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, list[str]]:
            return {
                "keys": _fill(key_parts, args, kwargs),
                "tags": _fill(tag_parts, args, kwargs),
                "expire": _fill(expire_parts, args, kwargs),
            }

        wrapper: Any
        if inspect.iscoroutinefunction(fn):

            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                result = await fn(*args, **kwargs)
                await cache.ainvalidate(**targets(args, kwargs))
                return result

        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                result = fn(*args, **kwargs)
                cache.invalidate(**targets(args, kwargs))
                return result

        return functools.update_wrapper(wrapper, fn)

    return decorate
