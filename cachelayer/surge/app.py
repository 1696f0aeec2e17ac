"""The shop under test: a Starlette app with catalog and session endpoints.

The same app serves both runs; the cached run wraps the three database reads with
``cache.cached`` exactly as a user of cachelayer would. ``/_surge/...`` endpoints let the
replay's driver start a run, switch the brown-out on and off and collect what the app
measured, whether the app runs in the driver's process or behind uvicorn in another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cachelayer.exceptions import OriginOverloadedError

from .db import Shop
from .pool import DatabaseError, InjectedFailureError, PoolTimeoutError
from .scenario import Scenario, SurgeError

SESSION_COOKIE = "session"
# Each failure a shop under overload really produces answers with its own status, so the
# load generator can tell the brown-out's injected failures from the overload's. Anything
# else is a bug in the replay and must surface as one rather than be counted as load.
FAILURE_STATUS: dict[type[Exception], int] = {
    InjectedFailureError: 502,  # the database failed the query (the brown-out's share)
    PoolTimeoutError: 503,  # no connection became free in time
    DatabaseError: 500,  # the database really failed
    # The cache's origin guard shed the load (origin_limit loads running for origin_wait)
    # and had no stale copy to serve instead: the shop is overloaded, and says so.
    OriginOverloadedError: 503,
}
INJECTED_STATUS = FAILURE_STATUS[InjectedFailureError]
OVERLOAD_ERRORS = tuple(FAILURE_STATUS)


def quiet_cache_warnings() -> None:
    """For the replay's entry points: the cache warns once per failing key or Redis call,
    which under a brown-out is hundreds of lines burying the table; its stats count every
    such event and the table reports them, so only errors are let through."""
    logging.getLogger("cachelayer").setLevel(logging.ERROR)


def make_cache(sc: Scenario, redis_url: str | None, namespace: str) -> Any:
    """The cached run's Cache: L1 only, or L1 + Redis when a Redis URL is given."""
    from cachelayer import Cache

    options = {"ttl": sc.ttl, "stale_ttl": sc.stale_ttl, **sc.cache_options}
    try:
        return Cache(redis_url, namespace=namespace, **options)
    except (TypeError, ValueError) as exc:
        raise SurgeError(f"the cache refused its options {options}: {exc}") from None


def build_app(
    shop: Shop, cache: Any | None, *, lifespan: Callable[[Starlette], Any] | None = None
) -> Starlette:
    """``lifespan`` is for a served app (uvicorn); in process, the driver owns shop and cache."""
    product, category, cart = shop.product, shop.category, shop.cart
    if cache is not None:
        product = cache.cached(key="product:{product_id}")(product)
        category = cache.cached(key="category:{category_id}")(category)
        cart = cache.cached(key="cart:{session}")(cart)

    async def answer(read: Callable[[], Awaitable[Any]]) -> Response:
        try:
            body = await read()
        except OVERLOAD_ERRORS as exc:
            return JSONResponse({"error": str(exc)}, status_code=FAILURE_STATUS[type(exc)])
        if body is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(body)

    async def product_page(request: Request) -> Response:
        return await answer(lambda: product(request.path_params["product_id"]))

    async def category_page(request: Request) -> Response:
        return await answer(lambda: category(request.path_params["category_id"]))

    async def cart_page(request: Request) -> Response:
        session = request.cookies.get(SESSION_COOKIE)
        if not session:
            return JSONResponse({"error": "no session cookie"}, status_code=401)
        return await answer(lambda: cart(session))

    async def start(request: Request) -> Response:
        # The driver's clock: time.monotonic() is system-wide, so timestamps taken here line
        # up with the driver's even when this app runs in another process.
        t0 = float((await request.json())["t0"])
        shop.pool.reset(t0)
        return JSONResponse({"ok": True, "now": time.monotonic()})

    async def degrade(request: Request) -> Response:
        body = await request.json()
        shop.pool.degrade(float(body["slowdown"]), float(body["fail_share"]))
        return JSONResponse({"ok": True})

    async def metrics(request: Request) -> Response:
        return JSONResponse(
            {
                "pool": shop.pool.metrics.snapshot(),
                "pool_size": shop.pool.size,
                "cache": None if cache is None else cache.stats(),
                "cache_repr": None if cache is None else repr(cache),
            }
        )

    routes = [
        Route("/products/{product_id:int}", product_page),
        Route("/categories/{category_id:int}", category_page),
        Route("/cart", cart_page),
        Route("/_surge/start", start, methods=["POST"]),
        Route("/_surge/degrade", degrade, methods=["POST"]),
        Route("/_surge/metrics", metrics),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
