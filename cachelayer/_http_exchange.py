"""One request answered by the app while the cache watches, and the ASGI types.

``Exchange`` is the per-request responder of ``CacheMiddleware`` (the shape of Starlette's
GZip responder): it wraps ``send``, holds the response start until the first body chunk shows
whether the response is one piece or a stream, and reports the response's fate (store it,
mark the URL hit-for-miss, or let waiters ask the app) as soon as that fate is known.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from ._cache import Loaded
from ._http_record import (
    GEN,
    MARKER,
    PASS_VALUE,
    VARY_NAMES,
    NotStored,
    Plan,
    answer,
    new_record,
    not_modified,
    plan_response,
)
from ._http_request import Request

if TYPE_CHECKING:
    from .asgi import CacheMiddleware

log = logging.getLogger("cachelayer.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class OriginError(Exception):
    """A background refresh got an error from the app; raised so the core keeps (and may
    serve, fail-safe) the stale entry instead of storing the error."""


def idle_receive() -> Receive:
    """``receive`` for a request nobody is connected to: an empty body, then silence."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # until the app stops listening (cancelled)
        sent = True
        return {"type": "http.request", "body": b"", "more_body": False}

    return receive


async def discard(message: Message) -> None:
    """``send`` for a request nobody is connected to."""


class Exchange:
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
        # A stale response that may stand in if the app fails (stale-if-error), and the
        # status of the failed response swallowed in its favour (0: the app raised).
        self.fallback: list[Any] | None = None
        self.swallowed: int | None = None

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

    async def refresh(self) -> Loaded[Any]:
        """The loader of a background refresh (the core's stale-while-revalidate or early
        refresh): nobody is connected, so the response goes to the cache only, and an error
        raises so the stale entry stays."""
        try:
            await self.mw.app(self.req.app_scope(), self.receive, self.capture)
        finally:
            self.decide(Loaded(PASS_VALUE, store=False))
        status = 0 if self.start is None else self.start["status"]
        if not 100 <= status < 500:
            raise OriginError(f"the app answered {status or 'nothing'}")
        assert self.outcome is not None
        return self.outcome

    async def run(self) -> None:
        try:
            await self.mw.app(self.req.app_scope(), self.receive, self.capture)
        except Exception:
            if self.fallback is None or self.started:
                raise
            log.warning("cachelayer: the app failed; serving stale (stale-if-error)", exc_info=True)
            self.swallowed = 0
        finally:
            # An app that failed (or answered oddly) leaves waiters nothing to share.
            self.decide(Loaded(PASS_VALUE, store=False))
        if self.swallowed is not None and self.fallback is not None:
            detail = f"fwd-status={self.swallowed}" if self.swallowed else "detail=app-error"
            status_field = self.mw.status_field(f"fwd=stale; {detail}")
            start, body = answer(self.fallback, self.req, self.mw.clock(), status_field)
            await self.send(start)
            await self.send(body)

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
        if self.swallowed is not None:
            return
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
            if self.fallback is not None and message["status"] >= 500:
                self.swallowed = message["status"]
                self.decide(Loaded(PASS_VALUE, store=False))
                return
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
        status = self.mw.status_field(self.label + "; stored")
        if (self.req.inm is not None or self.req.ims is not None) and not_modified(
            record, self.req
        ):
            start, empty = answer(record, self.req, self.mw.clock(), status)
            start["headers"] = [h for h in start["headers"] if h[0] != b"age"]
            await self.send(start)
            await self.send(empty)
            return
        headers = self.mw.headers_for(self.start, status)
        if not any(h[0].lower() == b"etag" for h in headers):
            headers += [(n, v) for n, v in record[2] if n == b"etag"]
        await self.send({**self.start, "headers": headers})
        await self.send(message)

    async def _start(self, reason: str | None) -> None:
        assert self.start is not None
        self.started = True
        detail = self.label
        if reason is not None and "detail=" not in detail:
            detail = f"{detail}; detail={reason}"
        headers = self.mw.headers_for(self.start, self.mw.status_field(detail))
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
        grace = max(plan.swr, plan.sie)  # the core keeps it this long past freshness
        self.decide(Loaded(record, ttl=ttl, stale_ttl=grace, tags=plan.tags))
        return record
