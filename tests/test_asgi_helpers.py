"""Shared pieces of the ASGI middleware tests (this module holds no tests of its own)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cachelayer import Cache
from cachelayer.asgi import CacheMiddleware
from cachelayer.testing import FakeClock

Handler = Callable[[Request], Awaitable[Response]]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Each test runs on a loop of its own, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, 60))


class Origin:
    """A Starlette app behind CacheMiddleware; ``calls[path]`` counts what reached the app."""

    def __init__(
        self,
        routes: dict[str, Handler],
        *,
        cache: Cache | None = None,
        clock: FakeClock | None = None,
        outer: list[Middleware] = (),  # type: ignore[assignment]
        inner: list[Middleware] = (),  # type: ignore[assignment]
        **options: Any,
    ) -> None:
        self.clock = clock or FakeClock()
        self.cache = cache or Cache(None, jitter=0.0, clock=self.clock)
        self.calls: dict[str, int] = {}

        def counted(path: str, handler: Handler) -> Handler:
            async def endpoint(request: Request) -> Response:
                self.calls[path] = self.calls.get(path, 0) + 1
                return await handler(request)

            return endpoint

        middleware = [
            *outer,
            Middleware(CacheMiddleware, cache=self.cache, **options),
            *inner,
        ]
        self.app = Starlette(
            routes=[Route(p, counted(p, h), methods=["GET", "HEAD", "POST", "PUT", "DELETE"])
                    for p, h in routes.items()],
            middleware=middleware,
        )  # fmt: skip

    def client(self, **kw: Any) -> httpx.AsyncClient:
        kw.setdefault("base_url", "http://shop.test")
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), **kw)

    def n(self, path: str) -> int:
        return self.calls.get(path, 0)


def fixed(body: str = "hello", status: int = 200, **headers: str) -> Handler:
    """A handler returning the same response every time; header names use ``_`` for ``-``."""
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}

    async def handler(request: Request) -> Response:
        return Response(body, status_code=status, headers=hdrs)

    return handler


async def call_raw(
    app: Any, path: str = "/", *, headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    method: str = "GET", raw_path: bytes | None = None, query: bytes = b"",
) -> tuple[int, dict[bytes, bytes], bytes]:  # fmt: skip
    """One request through the ASGI app with a hand-made scope (what httpx would refuse)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": raw_path or path.encode("latin-1"),
        "query_string": query, "root_path": "", "server": ("shop.test", 80),
        "client": ("127.0.0.1", 1234),
        "headers": [(b"host", b"shop.test"), *headers],
    }  # fmt: skip
    sent: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if requested:  # like a server: nothing more until the client goes away
            await asyncio.Event().wait()
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k: v for k, v in start["headers"]}, body
