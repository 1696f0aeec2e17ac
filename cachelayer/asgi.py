"""``CacheMiddleware``: a shared HTTP cache (RFC 9111) inside a Starlette or FastAPI app.

    from starlette.middleware import Middleware
    from cachelayer.asgi import CacheMiddleware

    app = Starlette(routes=routes, middleware=[Middleware(CacheMiddleware, cache=cache)])

Pure ASGI (no ``BaseHTTPMiddleware``), shaped like Starlette's ``GZipMiddleware``: a
per-request ``Exchange`` (``_http_exchange``) wraps ``send`` and holds the response start until
the first body chunk shows whether the response can be stored. It imports nothing from
Starlette, so it works in front of any ASGI app. What may be stored is decided in
``_http_request`` (requests) and ``_http_record`` (responses); this module is the plumbing
and the coalescing.

Coalescing rides on the core's single-flight: the first request for a cold key becomes the
loader. Its app runs in a child task that streams straight to its own client, and the load
resolves as soon as the response's fate is known, so waiters are released early (to ask the
app themselves) when the response turns out not to be shareable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

from ._cache import Cache, Loaded
from ._http_exchange import (
    ASGIApp,
    Exchange,
    Message,
    Receive,
    Scope,
    Send,
    discard,
    idle_receive,
)
from ._http_record import (
    AUTH_OK,
    GEN,
    MARK,
    PASS_VALUE,
    REC,
    SIE,
    SWR,
    VARY_DIGEST,
    VARY_NAMES,
    answer,
    kind_of,
    remaining,
)
from ._http_request import Request, classify, invalidation_keys, variant_key
from ._http_settings import DEFAULT_STATUSES, Rule, Settings
from .exceptions import LoadTimeoutError, OriginOverloadedError

__all__ = ["DEFAULT_STATUSES", "CacheMiddleware", "Rule"]

log = logging.getLogger("cachelayer.asgi")

_SAFE_METHODS = frozenset({"OPTIONS", "TRACE"})
_MAX_TRACKED_URLS = 10_000
_ANY_GRACE = float(2**31)


class CacheMiddleware:
    """A shared HTTP cache for an ASGI app, backed by a ``cachelayer.Cache``.

    Out of the box only GET/HEAD responses with explicit freshness (``s-maxage``,
    ``max-age``, ``Expires``) that are not personalised are stored. See docs/http-cache.md.

    Args:
        app: the ASGI app.
        cache: the ``Cache`` whose tiers hold the responses (its clock dates them).
        default_ttl: seconds to keep responses that carry no explicit freshness.
        rules: ``Rule`` objects; the first whose path glob matches applies.
        private_key: ``scope -> str | None``: partitions entries per principal (user or
            session), which makes requests with cookies or Authorization cacheable per
            principal; None from it means "do not cache this request".
        statuses: statuses that may be stored (default: RFC 9110's heuristically cacheable).
        max_body_size: larger responses are never stored and stream through untouched.
        max_variants: variants (``Vary``) kept per URL by this process.
        hit_for_miss_ttl: seconds an uncacheable URL is remembered as such (0: never).
        stale_while_revalidate, stale_if_error: seconds, for responses that do not say.
        allow_client_no_cache: honour a client's ``no-cache`` / ``Pragma`` (off: a client
            must not be able to force load onto the database).
        hosts: Host values (with or without port) to cache for; others go around the cache.
        trusted_forwarded_headers: forwarded headers (``X-Forwarded-Host``...) set by a proxy
            you trust; they become part of the key. Untrusted ones make requests bypass.
        tags_header: response header whose tags become the entry's tags (then stripped).
        cache_status: the cache's name in ``Cache-Status`` (RFC 9211); None to omit it.
        prefix: prefix of the keys this middleware uses in ``cache``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        cache: Cache,
        default_ttl: float | None = None,
        rules: Iterable[Rule] = (),
        private_key: Callable[[Mapping[str, Any]], str | None] | None = None,
        statuses: Collection[int] = DEFAULT_STATUSES,
        max_body_size: int = 1 << 20,
        max_variants: int = 32,
        hit_for_miss_ttl: float = 20.0,
        stale_while_revalidate: float = 0.0,
        stale_if_error: float = 0.0,
        allow_client_no_cache: bool = False,
        hosts: Iterable[str] | None = None,
        trusted_forwarded_headers: Iterable[str] = (),
        tags_header: str | None = "cache-tag",
        cache_status: str | None = "cachelayer",
        prefix: str = "http",
    ) -> None:
        self.app = app
        self.cache = cache
        self.settings = Settings(
            default_ttl=default_ttl,
            rules=rules,
            private_key=private_key,
            statuses=statuses,
            max_body_size=max_body_size,
            max_variants=max_variants,
            hit_for_miss_ttl=hit_for_miss_ttl,
            stale_while_revalidate=stale_while_revalidate,
            stale_if_error=stale_if_error,
            allow_client_no_cache=allow_client_no_cache,
            hosts=hosts,
            trusted_forwarded_headers=trusted_forwarded_headers,
            tags_header=tags_header,
            cache_status=cache_status,
            prefix=prefix,
        )
        # The Cache's own clock dates entries (so Age follows a FakeClock in tests), and its
        # jitter may lengthen a TTL, which HTTP freshness must never exceed. Neither is public
        # in the core yet; the defaults keep this working if they move.
        self.clock: Callable[[], float] = getattr(cache, "_clock", time.time)
        self._stretch = 1.0 + float(getattr(cache, "_jitter", 0.0))
        self._variants: dict[str, set[str]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if method != "GET" and method != "HEAD":
            if method in _SAFE_METHODS:
                await self.app(scope, receive, send)
            else:
                await self._unsafe(scope, receive, send)
            return
        try:
            req = classify(self.settings, scope)
        except Exception:  # hostile input must never raise out of the cache: go around it
            log.warning("cachelayer: cannot classify request; bypassing", exc_info=True)
            req = "error"
        if isinstance(req, str):
            await self.app(scope, receive, self._labelled(send, "fwd=bypass; detail=" + req))
            return
        await self._serve(req, receive, send)

    # --- GET and HEAD ------------------------------------------------------------------------

    async def _serve(self, req: Request, receive: Receive, send: Send) -> None:
        if req.refresh:
            await self._forward(req, receive, send, "fwd=request", store=True)
            return
        if req.head or req.lookup_only or req.only_if_cached:
            # Never lead a load: a HEAD would have to turn into a GET (and a possibly endless
            # stream) to fill the entry; the others must not store anything.
            value = await self._lookup(req.key)
        else:
            value, done = await self._load(req.key, req, None, receive, send)
            if done:
                return
        await self._reply(req, value, req.key, None, receive, send)

    async def _reply(
        self,
        req: Request,
        value: Any,
        key: str,
        primary: list[Any] | None,
        receive: Receive,
        send: Send,
    ) -> None:
        """Answer from ``value``, found under ``key`` (a variant of ``primary`` if given)."""
        kind = kind_of(value)
        if kind == REC:
            if req.auth and not value[AUTH_OK]:
                label = "fwd=bypass; detail=authorization"
                await self._forward(req, receive, send, label, key, primary)
                return
            names = value[VARY_NAMES]
            if names:
                digest = req.vary_digest(names)
                if digest != value[VARY_DIGEST]:
                    await self._other_variant(req, value, digest, receive, send, primary)
                    return
            now = self.clock()
            left = remaining(value, now)
            if left > 0:
                label = f"hit; ttl={int(left)}"
            elif -left < value[SWR]:
                label = f"fwd=stale; ttl={int(left)}"  # the core is refreshing it meanwhile
            elif req.only_if_cached:
                await self._not_cached(send)
                return
            else:
                # Kept for stale-if-error only: ask the app, and fall back to it on errors.
                fallback = value if -left < value[SIE] else None
                await self._forward(req, receive, send, "fwd=stale", key, primary, fallback)
                return
            start, body = answer(value, req, now, self.status_field(label))
            await send(start)
            await send(body)
        elif req.only_if_cached:
            await self._not_cached(send)
        else:
            detail = "; detail=hit-for-miss" if kind == MARK else ""
            label = ("fwd=uri-miss" if primary is None else "fwd=vary-miss") + detail
            await self._forward(req, receive, send, label, key, primary)

    async def _other_variant(
        self,
        req: Request,
        primary: list[Any],
        digest: str,
        receive: Receive,
        send: Send,
        found_as: list[Any] | None,
    ) -> None:
        """The stored response varies on request headers this request has different values
        for: look for (or load) this request's variant under a key of its own."""
        vkey = None if found_as is not None else self._variant_key(req.key, primary, digest)
        if vkey is None:  # too many variants, or a variant that does not match its own key
            await self._forward(req, receive, send, "fwd=vary-miss", store=False)
            return
        if req.head or req.lookup_only or req.only_if_cached:
            value = await self._lookup(vkey)
        else:
            value, done = await self._load(vkey, req, primary, receive, send)
            if done:
                return
        await self._reply(req, value, vkey, primary, receive, send)

    def _variant_key(self, key: str, primary: list[Any], digest: str) -> str | None:
        # The primary entry's generation is in the key: when the URL is invalidated or
        # reloaded, every variant stored under the old generation becomes unreachable.
        url = f"{key}#{primary[GEN]}"
        vkey = variant_key(key, f"v{primary[GEN]}.{digest}")
        seen = self._variants.get(url)
        if seen is None:
            if len(self._variants) >= _MAX_TRACKED_URLS:
                self._variants.clear()
            seen = self._variants[url] = set()
        if vkey not in seen:
            if len(seen) >= self.settings.max_variants:
                return None
            seen.add(vkey)
        return vkey

    async def _lookup(self, key: str) -> Any:
        try:
            return await self.cache.aget(key)
        except Exception:
            log.warning("cachelayer: lookup of %r failed; asking the app", key, exc_info=True)
            return None

    async def _load(
        self, key: str, req: Request, primary: list[Any] | None, receive: Receive, send: Send
    ) -> tuple[Any, bool]:
        """The stored value, or the coalesced load of it. ``done`` means this request has been
        answered already: it ran the load (the app answered it) or the origin is shedding."""
        exchange: Exchange | None = None
        waiting = True

        def lead() -> Awaitable[Loaded[Any]]:
            # Only misses and refreshes get here, so only they pay for an exchange.
            nonlocal exchange
            if not waiting:
                # The core refreshes in the background (stale-while-revalidate, early
                # refresh) after this request was answered: its client must never hear it.
                return Exchange(self, req, key, primary, idle_receive(), discard, "").refresh()
            label = "fwd=uri-miss" if primary is None else "fwd=vary-miss"
            exchange = Exchange(self, req, key, primary, receive, send, label)
            return exchange.lead()

        try:
            # The call allows any staleness: each entry's own grace (the response's
            # stale-while-revalidate / stale-if-error) is what bounds it.
            value = await self.cache.aget_or_load(key, lead, stale_ttl=_ANY_GRACE)
        except asyncio.CancelledError:
            if exchange is not None:
                exchange.abandon()
            raise
        except (OriginOverloadedError, LoadTimeoutError) as exc:
            if exchange is None or exchange.task is None:
                # The core is shedding load or gave up waiting for it: asking the app anyway
                # would pile onto the very origin it protects.
                await self._unavailable(send, exc)
                return None, True
            value = None
        except Exception:
            if exchange is None or exchange.task is None:
                log.warning("cachelayer: load of %r failed; asking the app", key, exc_info=True)
                return PASS_VALUE, False
            value = None  # the response went out; only storing it failed
        finally:
            waiting = False
        if exchange is None or exchange.task is None:
            return value, False
        try:
            await exchange.task
        except asyncio.CancelledError:
            exchange.abandon()
            raise
        return value, True

    async def _not_cached(self, send: Send) -> None:
        """RFC 9111 §5.2.1.7: ``only-if-cached`` and nothing fresh stored to answer with."""
        status = self.status_field("fwd=miss; detail=only-if-cached")
        headers = [(b"cache-status", status)] if status else []
        await send({"type": "http.response.start", "status": 504, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _unavailable(self, send: Send, exc: Exception) -> None:
        overloaded = isinstance(exc, OriginOverloadedError)
        status = 503 if overloaded else 504
        detail = "overloaded" if overloaded else "timeout"
        headers = [(b"retry-after", b"1"), (b"content-length", b"0")]
        status_field = self.status_field(f"fwd=miss; detail={detail}")
        if status_field is not None:
            headers.append((b"cache-status", status_field))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _forward(
        self,
        req: Request,
        receive: Receive,
        send: Send,
        label: str,
        key: str | None = None,
        primary: list[Any] | None = None,
        fallback: list[Any] | None = None,
        *,
        store: bool = True,
    ) -> None:
        """Ask the app for this request alone (no queueing behind others); store the
        response under ``key`` if it may be stored."""
        if not store or req.head or req.lookup_only:
            await self.app(req.scope, receive, self._labelled(send, label))  # type: ignore[arg-type]
            return
        key = req.key if key is None else key
        exchange = Exchange(self, req, key, primary, receive, send, label)
        exchange.fallback = fallback
        await exchange.run()
        loaded = exchange.outcome
        if loaded is not None and loaded.store and kind_of(loaded.value) == REC:
            try:
                await self.cache.aset(
                    key, loaded.value, ttl=loaded.ttl, stale_ttl=loaded.stale_ttl,
                    tags=loaded.tags or (),
                )  # fmt: skip
            except Exception:
                log.warning("cachelayer: storing %r failed", key, exc_info=True)

    # --- unsafe methods ----------------------------------------------------------------------

    async def _unsafe(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass through; a success invalidates the URL (RFC 9111 §4.4) before the client
        hears of it, so the client's next read cannot be served the old page."""
        status_field = self.status_field("fwd=method")

        async def send_invalidating(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if 200 <= message["status"] < 400:
                    await self._invalidate(scope, headers)
                if status_field is not None:
                    message = {**message, "headers": [*headers, (b"cache-status", status_field)]}
            await send(message)

        await self.app(scope, receive, send_invalidating)

    async def _invalidate(self, scope: Scope, headers: list[Any]) -> None:
        try:
            locations = [v for n, v in headers if n.lower() in (b"location", b"content-location")]
            keys = invalidation_keys(self.settings, scope, locations)
            if keys:
                await self.cache.adelete(*keys)
        except Exception:
            log.warning("cachelayer: invalidation after %s failed", scope["method"], exc_info=True)

    # --- small helpers -----------------------------------------------------------------------

    def status_field(self, detail: str) -> bytes | None:
        name = self.settings.cache_status
        return None if name is None else f"{name}; {detail}".encode("ascii")

    def _labelled(self, send: Send, label: str) -> Send:
        """``send`` with Cache-Status added and the tags header removed."""
        status_field = self.status_field(label)
        tags_header = self.settings.tags_header

        async def send_labelled(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": self.headers_for(message, status_field)}
            await send(message)

        return send_labelled if status_field is not None or tags_header else send

    def headers_for(self, start: Message, status_field: bytes | None) -> list[Any]:
        tags_header = self.settings.tags_header
        headers = [h for h in start.get("headers", []) if h[0].lower() != tags_header]
        if status_field is not None:
            headers.append((b"cache-status", status_field))
        return headers
