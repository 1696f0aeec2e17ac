"""A Starlette shop front behind cachelayer's CacheMiddleware.

    python examples/asgi_app.py           # serve on a free loopback port, tour, exit
    python examples/asgi_app.py --serve   # keep serving on http://127.0.0.1:8000

Set REDIS_URL to share cached pages between processes through Redis; without it the cache is
in-process only. The product page is public and fresh for 30 s; the cart is personal (it reads
a cookie), so the cache never stores it.
"""

from __future__ import annotations

import asyncio
import os
import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from cachelayer import Cache
from cachelayer.asgi import CacheMiddleware
from cachelayer.testing import free_port

DB_QUERIES = 0


async def product(request: Request) -> JSONResponse:
    global DB_QUERIES
    DB_QUERIES += 1
    await asyncio.sleep(0.05)  # the "database"
    item = {"id": int(request.path_params["id"]), "name": "teapot", "price": 12.5}
    return JSONResponse(
        item, headers={"Cache-Control": "public, max-age=30", "Cache-Tag": "catalog"}
    )


async def cart(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"cart of {request.cookies.get('sid', 'nobody')}")


def build_app(cache: Cache) -> Starlette:
    routes = [Route("/products/{id:int}", product), Route("/cart", cart)]
    return Starlette(routes=routes, middleware=[Middleware(CacheMiddleware, cache=cache)])


async def tour(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        burst = await asyncio.gather(*[client.get("/products/1") for _ in range(50)])
        print(f"50 concurrent GET /products/1 -> {sorted({r.status_code for r in burst})}")
        for label, headers in (("again", {}), ("conditional", None), ("with cookie", None)):
            if label == "conditional":
                headers = {"If-None-Match": burst[0].headers["etag"]}
            if label == "with cookie":
                headers = {"Cookie": "sid=alice"}
            r = await client.get("/products/1", headers=headers)
            print(f"GET /products/1 ({label}) -> {r.status_code} {r.headers['cache-status']}")
        r = await client.get("/cart", headers={"Cookie": "sid=alice"})
        print(f"GET /cart -> {r.text!r} {r.headers['cache-status']}")
    print(f"database queries issued: {DB_QUERIES}")


async def main() -> None:
    redis_url = os.environ.get("REDIS_URL")
    async with Cache(redis_url, namespace="example-asgi", ttl=30) as cache:
        print("L1 + Redis" if redis_url else "L1 only")
        serve = "--serve" in sys.argv
        port = 8000 if serve else free_port()
        config = uvicorn.Config(
            build_app(cache), host="127.0.0.1", port=port, log_level="warning",
            lifespan="off", ws="none", access_log=False,
        )  # fmt: skip
        server = uvicorn.Server(config)
        if serve:
            await server.serve()
            return
        task = asyncio.create_task(server.serve())
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        try:
            await tour(port)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)


if __name__ == "__main__":
    asyncio.run(main())
