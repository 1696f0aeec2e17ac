"""The middleware under a real server: uvicorn on a free loopback port, over real HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from test_asgi_helpers import Origin, run

from cachelayer import Cache
from cachelayer.testing import FakeClock, free_port

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """uvicorn serving ``app`` on 127.0.0.1 until the block ends (bounded start and stop)."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none",
        access_log=False,
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start in 5 s"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@pytest.mark.redis
def test_real_http_coalesces_caches_and_never_leaks(redis_url: str) -> None:
    async def page(request: Request) -> Response:
        await asyncio.sleep(0.1)
        return Response("catalog page", headers={"Cache-Control": "public, max-age=60"})

    async def me(request: Request) -> Response:
        who = request.cookies.get("user", "nobody")
        return Response(f"page of {who}", headers={"Cache-Control": "public, max-age=60"})

    cache = Cache(redis_url, namespace="server-test", jitter=0.0)
    origin = Origin({"/catalog": page, "/me": me}, cache=cache)

    async def scenario() -> None:
        async with serving(origin.app) as base:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(base_url=base, timeout=10, limits=limits) as c:
                responses = await asyncio.gather(*[c.get("/catalog") for _ in range(200)])
                assert {(r.status_code, r.text) for r in responses} == {(200, "catalog page")}
                assert origin.n("/catalog") == 1
                hit = await c.get("/catalog")
                assert hit.headers["cache-status"].startswith("cachelayer; hit")
                assert "date" in hit.headers and "age" in hit.headers
                assert (
                    await c.get("/catalog", headers={"If-None-Match": hit.headers["etag"]})
                ).status_code == 304
                head = await c.head("/catalog")
                assert head.content == b"" and head.headers["content-length"] == "12"
                a = await c.get("/me", headers={"Cookie": "user=A"})
                b = await c.get("/me")
                assert a.text == "page of A" and b.text == "page of nobody"
        await cache.aclose()

    run(scenario())


def run_example(redis_url: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    if redis_url:
        env["REDIS_URL"] = redis_url
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "asgi_app.py")],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout


def test_asgi_example_runs_l1_only() -> None:
    out = run_example(None)
    assert "L1 only" in out and "(conditional) -> 304 cachelayer; hit" in out
    assert re.search(r"database queries issued:\s+2$", out, re.M)  # one miss, one cookie


@pytest.mark.redis
def test_asgi_example_runs_with_redis(redis_url: str) -> None:
    out = run_example(redis_url)
    assert "L1 + Redis" in out
    assert re.search(r"database queries issued:\s+2$", out, re.M)


def test_background_refresh_never_writes_to_a_keep_alive_connection() -> None:
    """A stale-while-revalidate refresh runs after its request was answered; over a real
    keep-alive connection a stray second response would break every later exchange."""
    version = 0

    async def page(request: Request) -> Response:
        nonlocal version
        version += 1
        await asyncio.sleep(0.02)
        cc = "max-age=10, stale-while-revalidate=30"
        return Response(f"v{version}", headers={"Cache-Control": cc})

    clock = FakeClock()
    origin = Origin({"/": page}, cache=Cache(None, jitter=0.0, clock=clock))

    async def scenario() -> None:
        async with serving(origin.app) as base:
            limits = httpx.Limits(max_connections=1)
            async with httpx.AsyncClient(base_url=base, timeout=10, limits=limits) as c:
                assert (await c.get("/")).text == "v1"
                clock.advance(15)
                stale = await c.get("/")
                assert stale.text == "v1" and "fwd=stale" in stale.headers["cache-status"]
                texts = [(await c.get("/")).text for _ in range(30)]
                for _ in range(100):
                    if texts[-1] == "v2":
                        break
                    await asyncio.sleep(0.01)
                    texts.append((await c.get("/")).text)
                assert set(texts) <= {"v1", "v2"} and texts[-1] == "v2" and version == 2

    run(scenario())
