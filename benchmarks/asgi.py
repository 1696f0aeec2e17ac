"""What a cached response costs through CacheMiddleware, over real HTTP, against baselines and
peers measured in the same run.

    python benchmarks/asgi.py             # full run (a couple of minutes)
    python benchmarks/asgi.py --quick     # fewer requests and repeats, for a smoke check

Every app runs under its own uvicorn process on 127.0.0.1 (one worker, what uvicorn picks for
this venv); the load comes from this process over keep-alive HTTP/1.1 connections, with a
minimal raw-socket client so the client costs far less than the server. Rows:

* starlette plain: a trivial uncached Starlette endpoint returning the body from memory (with
  the same Cache-Control the cached app's endpoint sends), the baseline a cached hit is held
  to (target: hit <= 1.3x its cost, i.e. >= 0.77x its req/s);
* cachelayer hit, no Cache-Status: the same with ``cache_status=None``, to show what the extra
  response headers cost in uvicorn's pure-Python HTTP/1.1 writer;
* cachelayer hit / miss / bypass: the same body behind CacheMiddleware (L1 + Redis L2 when
  redis-server exists), where a miss is a new URL (app runs, response stored) and a bypass is
  a request with a Cookie;
* fastapi plain, fastapi + cachelayer, fastapi-cache2 (InMemoryBackend) and cashews (mem://,
  with and without lock=True) on the same FastAPI endpoint.

Then the concurrency check: 200 simultaneous requests for a cold URL whose handler takes
50 ms, and how many times each app's handler ran. Figures are min/median/max over repeats;
repeats are interleaved so drift hits every row alike. Absolute numbers depend on the
machine; ratios to the baseline measured in the same run hold better.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

PAYLOAD = {"items": [{"id": i, "name": f"product {i}", "price": i * 1.5} for i in range(25)]}
BODY = json.dumps(PAYLOAD, separators=(",", ":")).encode()
HEADERS = {"Cache-Control": "public, max-age=3600"}
SLOW = 0.05  # seconds the "database" takes on the cold-URL endpoint

# --- the apps (each runs in its own server process) -----------------------------------------


def build(name: str, redis_url: str | None) -> Any:
    calls = {"n": 0}
    if name.startswith("starlette"):
        return _starlette_app(name, redis_url, calls)
    return _fastapi_app(name, redis_url, calls)


def _starlette_app(name: str, redis_url: str | None, calls: dict[str, int]) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    cached = name.startswith("starlette-cachelayer")
    headers = HEADERS  # the baseline answers exactly what the cached app's endpoint answers

    async def page(request: Request) -> Response:
        return Response(BODY, media_type="application/json", headers=headers)

    async def cold(request: Request) -> Response:
        calls["n"] += 1
        await asyncio.sleep(SLOW)
        return Response(BODY, media_type="application/json", headers=headers)

    async def count(request: Request) -> Response:
        return Response(str(calls["n"]))

    routes = [Route("/page", page), Route("/cold/{n:int}", cold), Route("/calls", count)]
    middleware = []
    if cached:
        from cachelayer import Cache
        from cachelayer.asgi import CacheMiddleware

        cache = Cache(redis_url, namespace=name)  # one namespace per app: no shared entries
        status = None if name.endswith("-quiet") else "cachelayer"
        middleware.append(Middleware(CacheMiddleware, cache=cache, cache_status=status))
    return Starlette(routes=routes, middleware=middleware)


def _fastapi_app(name: str, redis_url: str | None, calls: dict[str, int]) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()
    decorate: Callable[[Any], Any] = lambda f: f  # noqa: E731
    if name == "fastapi-cachelayer":
        from cachelayer import Cache
        from cachelayer.asgi import CacheMiddleware

        app.add_middleware(CacheMiddleware, cache=Cache(redis_url, namespace=name))
    elif name == "fastapi-cache2":
        from fastapi_cache import FastAPICache
        from fastapi_cache.backends.inmemory import InMemoryBackend
        from fastapi_cache.decorator import cache as fc_cache

        FastAPICache.init(InMemoryBackend(), prefix="bench")
        decorate = fc_cache(expire=3600)
    elif name.startswith("cashews"):
        from cashews import cache as cw

        cw.setup("mem://")
        decorate = cw(ttl="1h", lock=name == "cashews-lock")

    if name == "fastapi-cachelayer":

        @app.get("/page")
        async def page() -> Any:
            return JSONResponse(PAYLOAD, headers=HEADERS)

        @app.get("/cold/{n}")
        async def cold(n: int) -> Any:
            calls["n"] += 1
            await asyncio.sleep(SLOW)
            return JSONResponse(PAYLOAD, headers=HEADERS)

    else:

        @app.get("/page")
        @decorate
        async def page() -> Any:
            return PAYLOAD

        @app.get("/cold/{n}")
        @decorate
        async def cold(n: int) -> Any:
            calls["n"] += 1
            await asyncio.sleep(SLOW)
            return PAYLOAD

    @app.get("/calls")
    async def count() -> Any:
        return PlainTextResponse(str(calls["n"]))

    return app


def serve(name: str, port: int, redis_url: str | None) -> None:
    import uvicorn

    config = uvicorn.Config(
        build(name, redis_url), host="127.0.0.1", port=port, log_level="error",
        access_log=False, lifespan="on", ws="none",
    )  # fmt: skip
    uvicorn.Server(config).run()


# --- the load ---------------------------------------------------------------------------------


def request(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: bench.local\r\n{extra}\r\n".encode()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> int:
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at >= 0:
        length = int(lower[at + 15 : lower.find(b"\r\n", at)])
        await reader.readexactly(length)
    return status


async def load(
    port: int, make: Callable[[int], bytes], total: int, conns: int
) -> tuple[float, list[float]]:
    """Closed loop: ``conns`` keep-alive connections share ``total`` requests.
    Returns (requests per second, latencies in seconds)."""
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in counter:
                t0 = time.perf_counter()
                status = await _exchange(reader, writer, make(i))
                latencies.append(time.perf_counter() - t0)
                if status >= 400:
                    raise RuntimeError(f"status {status}")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(conns)]), 120)
    return total / (time.perf_counter() - started), latencies


async def app_calls_under_concurrency(port: int, n: int, tag: int) -> int:
    async def one(path: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await _exchange(reader, writer, request(path))
        finally:
            writer.close()

    async def calls() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request("/calls"))
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            return int(await reader.readexactly(length))
        finally:
            writer.close()

    before = await calls()
    statuses = await asyncio.wait_for(asyncio.gather(*[one(f"/cold/{tag}") for _ in range(n)]), 60)
    assert set(statuses) == {200}, statuses
    return await calls() - before


# --- orchestration ----------------------------------------------------------------------------

SERVERS = [
    "starlette-plain",
    "starlette-cachelayer",
    "starlette-cachelayer-quiet",
    "fastapi-plain",
    "fastapi-cachelayer",
    "fastapi-cache2",
    "cashews",
    "cashews-lock",
]
COOKIE = "Cookie: s=1\r\n"
# (row, server, request maker); the first row is the baseline of the ratio column.
WORKLOADS: list[tuple[str, str, Callable[[int], bytes]]] = [
    ("starlette plain (baseline)", "starlette-plain", lambda i: request("/page")),
    ("cachelayer hit", "starlette-cachelayer", lambda i: request("/page")),
    ("cachelayer hit, no Cache-Status", "starlette-cachelayer-quiet", lambda i: request("/page")),
    ("cachelayer miss (new URL)", "starlette-cachelayer", lambda i: request(f"/page?m={i}")),
    ("cachelayer bypass (cookie)", "starlette-cachelayer", lambda i: request("/page", COOKIE)),
    ("fastapi plain", "fastapi-plain", lambda i: request("/page")),
    ("fastapi + cachelayer hit", "fastapi-cachelayer", lambda i: request("/page")),
    ("fastapi-cache2 hit", "fastapi-cache2", lambda i: request("/page")),
    ("cashews hit", "cashews", lambda i: request("/page")),
    ("cashews(lock=True) hit", "cashews-lock", lambda i: request("/page")),
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on {port} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on {port} did not listen in {timeout}s")


def shifted(make: Callable[[int], bytes], offset: int) -> Callable[[int], bytes]:
    return lambda i: make(i + offset)


def spread(values: list[float], fmt: str) -> str:
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


async def measure(ports: dict[str, int], total: int, conns: int, repeat: int) -> None:
    rps: dict[str, list[float]] = {row: [] for row, _, _ in WORKLOADS}
    p99: dict[str, list[float]] = {row: [] for row, _, _ in WORKLOADS}
    ratio: dict[str, list[float]] = {row: [] for row, _, _ in WORKLOADS}
    for _row, server, make in WORKLOADS:  # warm every app (and fill the caches)
        await load(ports[server], make, 200, 4)
    for r in range(repeat):
        base = 0.0
        for row, server, make in WORKLOADS:
            offset = (r + 1) * 1_000_000  # misses stay misses across repeats
            rate, lat = await load(ports[server], shifted(make, offset), total, conns)
            lat.sort()
            rps[row].append(rate)
            p99[row].append(lat[int(len(lat) * 0.99) - 1] * 1000)
            base = base or rate
            ratio[row].append(base / rate)  # cost relative to the baseline
    print(f"\n{total} requests x {repeat} repeats, {conns} keep-alive connections")
    print(
        f"{'row':30} {'req/s min/med/max':>24} {'p99 ms min/med/max':>22} {'cost x baseline':>20}"
    )
    for row, _, _ in WORKLOADS:
        print(
            f"{row:32} {spread(rps[row], '.0f'):>24} {spread(p99[row], '.2f'):>22} "
            f"{spread(ratio[row], '.2f'):>20}"
        )


async def coalescing(ports: dict[str, int], n: int, repeat: int) -> None:
    print(f"\n{n} concurrent requests for a cold URL (handler takes {SLOW * 1000:.0f} ms)")
    print(f"{'app':24} {'handler runs min/med/max':>26}")
    for server in SERVERS:
        if server.endswith(("plain", "quiet")):
            continue
        runs = [await app_calls_under_concurrency(ports[server], n, 10 + r) for r in range(repeat)]
        print(f"{server:24} {spread([float(x) for x in runs], '.0f'):>26}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.redis)
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cachelayer.testing import RedisServer

    total, repeat = (1000, 3) if args.quick else (4000, 7)
    redis: RedisServer | None = None
    try:
        redis = RedisServer().start()
    except FileNotFoundError:
        print("redis-server not found: cachelayer runs L1 only")
    procs: list[subprocess.Popen[bytes]] = []
    ports: dict[str, int] = {}
    try:
        for server in SERVERS:
            port = ports[server] = free_port()
            cmd = [sys.executable, __file__, "--serve", server, "--port", str(port)]
            if redis is not None:
                cmd += ["--redis", redis.url]
            procs.append(subprocess.Popen(cmd))
        for proc, server in zip(procs, SERVERS, strict=True):
            wait_listening(ports[server], proc)
        import uvicorn

        print(
            f"uvicorn {uvicorn.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
        )
        print("cachelayer tiers:", "L1 + Redis" if redis else "L1 only")
        asyncio.run(measure(ports, total, 16, repeat))
        asyncio.run(coalescing(ports, 200, repeat))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if redis is not None:
            redis.stop()


if __name__ == "__main__":
    main()
