"""``CacheMiddleware``: a shared HTTP cache (RFC 9111) inside a Starlette or FastAPI app.

    from starlette.middleware import Middleware
    from cachelayer.asgi import CacheMiddleware

    app = Starlette(routes=routes, middleware=[Middleware(CacheMiddleware, cache=cache)])

Pure ASGI (no ``BaseHTTPMiddleware``), shaped like Starlette's ``GZipMiddleware``: a per-request
``_Exchange`` wraps ``send`` and holds the response start until the first body chunk shows
whether the response can be stored. It imports nothing from Starlette, so it works in front of
any ASGI app. What may be stored is decided in ``_http_request`` (requests) and
``_http_record`` (responses); this module is the plumbing and the coalescing.

Coalescing rides on the core's single-flight: the first request for a cold key becomes the
loader. Its app runs in a child task that streams straight to its own client, and the load
resolves as soon as the response's fate is known, so waiters are released early (to ask the
app themselves) when the response turns out not to be shareable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, MutableMapping
from typing import Any

from ._cache import Cache, Loaded
from ._http_record import (
    AUTH_OK,
    GEN,
    MARK,
    MARKER,
    PASS_VALUE,
    REC,
    STALE,
    VARY_NAMES,
    VARY_VALUES,
    NotStored,
    Plan,
    answer,
    new_record,
    not_modified,
    plan_response,
    remaining,
)
from ._http_request import (
    DEFAULT_STATUSES,
    Request,
    Rule,
    Settings,
    classify,
    invalidation_keys,
)

__all__ = ["DEFAULT_STATUSES", "CacheMiddleware", "Rule"]

log = logging.getLogger("cachelayer.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SAFE_METHODS = frozenset({"OPTIONS", "TRACE"})
_MAX_TRACKED_URLS = 10_000


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
            value, led = await self._load(req.key, req, None, receive, send)
            if led:
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
        kind = value[0] if type(value) is list and value else None
        if kind == REC:
            if req.auth and not value[AUTH_OK]:
                label = "fwd=bypass; detail=authorization"
                await self._forward(req, receive, send, label, key, primary)
                return
            names = value[VARY_NAMES]
            if names:
                values = req.vary_values(names)
                if values != value[VARY_VALUES]:
                    await self._other_variant(req, value, values, receive, send, primary)
                    return
            now = self.clock()
            left = remaining(value, now)
            if left > 0:
                label = f"hit; ttl={int(left)}"
            elif left + value[STALE] > 0:
                label = f"fwd=stale; ttl={int(left)}"  # the core is refreshing it meanwhile
            else:
                await self._forward(req, receive, send, "fwd=stale", key, primary)
                return
            start, body = answer(value, req, now, self._status(label))
            await send(start)
            await send(body)
        elif value is None and req.only_if_cached:
            status = self._status("fwd=miss; detail=only-if-cached")
            headers = [(b"cache-status", status)] if status else []
            await send({"type": "http.response.start", "status": 504, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
        else:
            detail = "; detail=hit-for-miss" if kind == MARK else ""
            store = not (req.head or req.lookup_only)
            label = ("fwd=uri-miss" if primary is None else "fwd=vary-miss") + detail
            await self._forward(req, receive, send, label, key, primary, store=store)

    async def _other_variant(
        self,
        req: Request,
        primary: list[Any],
        values: list[str | None],
        receive: Receive,
        send: Send,
        found_as: list[Any] | None,
    ) -> None:
        """The stored response varies on request headers this request has different values
        for: look for (or load) this request's variant under a key of its own."""
        vkey = None if found_as is not None else self._variant_key(req.key, primary, values)
        if vkey is None:  # too many variants, or a variant that does not match its own key
            await self._forward(req, receive, send, "fwd=vary-miss", store=False)
            return
        if req.head or req.lookup_only or req.only_if_cached:
            value = await self._lookup(vkey)
        else:
            value, led = await self._load(vkey, req, primary, receive, send)
            if led:
                return
        await self._reply(req, value, vkey, primary, receive, send)

    def _variant_key(self, key: str, primary: list[Any], values: list[str | None]) -> str | None:
        # The primary entry's generation is in the key: when the URL is invalidated or
        # reloaded, every variant stored under the old generation becomes unreachable.
        url = f"{key}#{primary[GEN]}"
        digest = hashlib.blake2b(json.dumps(values).encode(), digest_size=16).hexdigest()
        vkey = f"{url}:{digest}"
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
        """The stored value, or the coalesced load of it. ``led`` means this request ran the
        load and its response has already been sent by the app."""
        exchange: _Exchange | None = None

        def lead() -> Awaitable[Loaded[Any]]:
            # Only misses get here, so only they pay for an exchange.
            nonlocal exchange
            label = "fwd=uri-miss" if primary is None else "fwd=vary-miss"
            exchange = _Exchange(self, req, key, primary, receive, send, label)
            return exchange.lead()

        try:
            value = await self.cache.aget_or_load(key, lead)
        except asyncio.CancelledError:
            if exchange is not None:
                exchange.abandon()
            raise
        except Exception:
            if exchange is None or exchange.task is None:
                log.warning("cachelayer: load of %r failed; asking the app", key, exc_info=True)
                return PASS_VALUE, False
            value = None  # the response went out; only storing it failed
        if exchange is None or exchange.task is None:
            return value, False
        try:
            await exchange.task
        except asyncio.CancelledError:
            exchange.abandon()
            raise
        return value, True

    async def _forward(
        self,
        req: Request,
        receive: Receive,
        send: Send,
        label: str,
        key: str | None = None,
        primary: list[Any] | None = None,
        *,
        store: bool = True,
    ) -> None:
        """Ask the app for this request alone (no queueing behind others); store the
        response under ``key`` if it may be stored."""
        if not store:
            await self.app(req.scope, receive, self._labelled(send, label))  # type: ignore[arg-type]
            return
        key = req.key if key is None else key
        exchange = _Exchange(self, req, key, primary, receive, send, label)
        await exchange.run()
        loaded = exchange.outcome
        if loaded is not None and loaded.store and loaded.value[0] == REC:
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
        status_field = self._status("fwd=method")

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

    def _status(self, detail: str) -> bytes | None:
        name = self.settings.cache_status
        return None if name is None else f"{name}; {detail}".encode("ascii")

    def _labelled(self, send: Send, label: str) -> Send:
        """``send`` with Cache-Status added and the tags header removed."""
        status_field = self._status(label)
        tags_header = self.settings.tags_header

        async def send_labelled(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": self._headers(message, status_field)}
            await send(message)

        return send_labelled if status_field is not None or tags_header else send

    def _headers(self, start: Message, status_field: bytes | None) -> list[Any]:
        tags_header = self.settings.tags_header
        headers = [h for h in start.get("headers", []) if h[0].lower() != tags_header]
        if status_field is not None:
            headers.append((b"cache-status", status_field))
        return headers


class _Exchange:
    """One request answered by the app while the cache watches (GZipMiddleware's responder
    shape): the start is held until the first body chunk, which shows whether the response is
    one piece (stored, ETag added) or a stream (forwarded at once, stored if it stays small)."""

    def __init__(
        self,
        mw: CacheMiddleware,
        req: Request,
        key: str,
        primary: list[Any] | None,
        receive: Receive,
        send: Send,
        label: str,
    ) -> None:
        self.mw = mw
        self.req = req
        self.key = key
        self.primary = primary  # set when loading a variant of this stored response
        self.receive = receive
        self.send = send
        self.label = label
        self.task: asyncio.Task[None] | None = None
        self.fate: asyncio.Future[Loaded[Any]] | None = None
        self.outcome: Loaded[Any] | None = None
        self.plan: Plan | None = None
        self.start: Message | None = None
        self.started = False
        self.passthrough = False
        self.chunks: list[bytes] = []
        self.size = 0

    async def lead(self) -> Loaded[Any]:
        """The loader the core calls when this request leads: the app runs in a child task
        (streaming to this client) and the load ends as soon as the response's fate is known."""
        loop = asyncio.get_running_loop()
        self.fate = loop.create_future()
        self.task = loop.create_task(self.run())
        try:
            return await self.fate
        except asyncio.CancelledError:
            self.abandon()
            raise

    def abandon(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def run(self) -> None:
        try:
            await self.mw.app(self.req.app_scope(), self.receive, self.capture)
        finally:
            # An app that failed (or answered oddly) leaves waiters nothing to share.
            self.decide(Loaded(PASS_VALUE, store=False))

    def decide(self, loaded: Loaded[Any]) -> None:
        if self.outcome is None:
            self.outcome = loaded
            if self.fate is not None and not self.fate.done():
                self.fate.set_result(loaded)

    def refuse(self, why: NotStored) -> None:
        ttl = self.mw.settings.hit_for_miss_ttl
        if why.mark and ttl > 0:
            self.decide(Loaded(MARKER, ttl=ttl, stale_ttl=0))
        else:
            self.decide(Loaded(PASS_VALUE, store=False))

    async def capture(self, message: Message) -> None:
        if self.passthrough:
            await self.send(message)
            return
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
            try:
                plan = plan_response(
                    self.mw.settings, self.req, message["status"], message.get("headers", []),
                    self.mw.clock(),
                )  # fmt: skip
            except Exception:
                log.warning("cachelayer: cannot judge a response; not storing", exc_info=True)
                plan = NotStored("error", mark=False)
            if message.get("trailers"):
                plan = NotStored("trailers", mark=False)
            if isinstance(plan, NotStored):
                self.refuse(plan)
                await self._start(plan.reason)
            else:
                self.plan = plan
            return
        if kind != "http.response.body" or self.plan is None:
            # pathsend, zero-copy, early hints, trailers: not ours to store or to delay.
            self.refuse(NotStored("extension", mark=False))
            if self.start is not None and not self.started:
                await self._start("extension")
            self.passthrough = True
            await self.send(message)
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if not self.started and not more:
            await self._single(body, message)
            return
        if not self.started:
            await self._start(None)
        self.size += len(body)
        if self.size > self.mw.settings.max_body_size:
            self.refuse(NotStored("too-large", mark=True))
            self.passthrough, self.chunks = True, []
        else:
            self.chunks.append(body)
        await self.send(message)
        if not more and not self.passthrough:
            self._complete(b"".join(self.chunks))

    async def _single(self, body: bytes, message: Message) -> None:
        """A response in one piece: store it, then answer this client as a hit would
        (derived ETag, its own conditional request answered with 304)."""
        record = self._complete(body)
        if record is None:
            await self._start(None)
            await self.send(message)
            return
        assert self.start is not None
        self.started = True
        status = self.mw._status(self.label + "; stored")
        if (self.req.inm is not None or self.req.ims is not None) and not_modified(
            record, self.req
        ):
            start, empty = answer(record, self.req, self.mw.clock(), status)
            start["headers"] = [h for h in start["headers"] if h[0] != b"age"]
            await self.send(start)
            await self.send(empty)
            return
        headers = self.mw._headers(self.start, status)
        if not any(h[0].lower() == b"etag" for h in headers):
            headers += [(n, v) for n, v in record[2] if n == b"etag"]
        await self.send({**self.start, "headers": headers})
        await self.send(message)

    async def _start(self, reason: str | None) -> None:
        assert self.start is not None
        self.started = True
        detail = self.label if reason is None else f"{self.label}; detail={reason}"
        headers = self.mw._headers(self.start, self.mw._status(detail))
        await self.send({**self.start, "headers": headers})

    def _complete(self, body: bytes) -> list[Any] | None:
        plan = self.plan
        assert plan is not None
        if plan.content_length is not None and plan.content_length != len(body):
            self.refuse(NotStored("content-length", mark=False))
            return None
        if len(body) > self.mw.settings.max_body_size:
            self.refuse(NotStored("too-large", mark=True))
            return None
        if self.primary is not None:
            if list(plan.vary) != self.primary[VARY_NAMES]:
                self.refuse(NotStored("vary", mark=False))  # the app changed its Vary
                return None
            gen = self.primary[GEN]
        else:
            gen = secrets.token_hex(8) if plan.vary else ""
        record = new_record(plan, body, self.mw.clock(), self.req, gen)
        # The core may stretch a TTL by its jitter; HTTP freshness must not be exceeded.
        ttl = (plan.lifetime - plan.age0) / self.mw._stretch
        self.decide(Loaded(record, ttl=ttl, stale_ttl=plan.stale, tags=plan.tags))
        return record
