"""Concurrent identical requests reach the app once; uncacheable URLs are not queued; stale
responses are served as the response allows; response tags invalidate pages everywhere."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from test_asgi_helpers import Origin, call_raw, run

from cachelayer import Cache
from cachelayer.testing import FakeClock

N = 300


class Gate:
    """Outer middleware: ``ready`` is set once ``n`` requests are inside, so the one request
    that reaches the app can hold the flight open until all the others have joined it."""

    def __init__(self, app: Any, n: int, ready: asyncio.Event) -> None:
        self.app, self.n, self.ready, self.entered = app, n, ready, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.entered += 1
            if self.entered >= self.n:
                self.ready.set()
        await self.app(scope, receive, send)


def gated(routes: dict[str, Any], n: int, ready: asyncio.Event, **kw: Any) -> Origin:
    return Origin(routes, outer=[Middleware(Gate, n=n, ready=ready)], **kw)


def test_hundreds_of_concurrent_requests_for_a_cold_url_reach_the_app_once() -> None:
    ready = asyncio.Event()

    async def page(request: Request) -> Response:
        await asyncio.wait_for(ready.wait(), 5)
        return Response("product page", headers={"Cache-Control": "max-age=60"})

    origin = gated({"/product/1": page}, N, ready)

    async def scenario() -> None:
        async with origin.client() as c:
            responses = await asyncio.gather(*[c.get("/product/1") for _ in range(N)])
        assert {r.status_code for r in responses} == {200}
        assert {r.text for r in responses} == {"product page"}
        assert origin.n("/product/1") == 1

    run(scenario())


@pytest.mark.redis
def test_coalescing_with_redis_and_the_next_process_reads_l2(redis_url: str) -> None:
    ready = asyncio.Event()

    async def page(request: Request) -> Response:
        await asyncio.wait_for(ready.wait(), 5)
        return Response("listing", headers={"Cache-Control": "s-maxage=60"})

    cache = Cache(redis_url, jitter=0.0, namespace="coalesce")
    origin = gated({"/list": page}, 200, ready, cache=cache)
    other = Origin({"/list": page}, cache=Cache(redis_url, jitter=0.0, namespace="coalesce"))

    async def scenario() -> None:
        async with origin.client() as c:
            responses = await asyncio.gather(*[c.get("/list") for _ in range(200)])
        assert {r.text for r in responses} == {"listing"} and origin.n("/list") == 1
        async with other.client() as c:
            assert (await c.get("/list")).headers["cache-status"].startswith("cachelayer; hit")
        assert other.n("/list") == 0
        await cache.aclose()
        await other.cache.aclose()

    run(scenario())


def test_waiters_of_an_unshareable_response_ask_the_app_themselves() -> None:
    async def welcome(request: Request) -> Response:
        await asyncio.sleep(0.05)
        who = request.headers.get("x-user", "?")
        r = Response(f"hi {who}", headers={"Cache-Control": "public, max-age=60"})
        r.set_cookie("sid", f"sid-of-{who}")
        return r

    origin = Origin({"/": welcome})

    async def scenario() -> None:
        async with origin.client() as c:
            users = [str(i) for i in range(50)]
            responses = await asyncio.gather(*[c.get("/", headers={"X-User": u}) for u in users])
        for user, r in zip(users, responses, strict=True):
            assert r.text == f"hi {user}" and r.cookies["sid"] == f"sid-of-{user}"

    run(scenario())


def test_waiters_with_another_variant_are_redispatched_not_served_the_wrong_one() -> None:
    async def lang(request: Request) -> Response:
        await asyncio.sleep(0.05)
        value = request.headers.get("accept-language", "-")
        return Response(value, headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"})

    origin = Origin({"/": lang})

    async def scenario() -> None:
        async with origin.client() as c:
            langs = ["en", "fr", "de"] * 40
            responses = await asyncio.gather(
                *[c.get("/", headers={"Accept-Language": v}) for v in langs]
            )
        assert [r.text for r in responses] == langs
        # one load for the winner's variant, then one per other variant (coalesced too)
        assert origin.n("/") <= 5

    run(scenario())


def test_hit_for_miss_lets_requests_to_uncacheable_urls_run_side_by_side() -> None:
    running = peak = 0

    async def live(request: Request) -> Response:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return Response("live", headers={"Cache-Control": "no-store"})

    origin = Origin({"/live": live})

    async def scenario() -> None:
        async with origin.client() as c:
            first = await c.get("/live")
            assert first.headers["cache-status"] == "cachelayer; fwd=uri-miss; detail=no-store"
            responses = await asyncio.gather(*[c.get("/live") for _ in range(20)])
        assert all("hit-for-miss" in r.headers["cache-status"] for r in responses)
        assert peak == 20 and origin.n("/live") == 21

    run(scenario())


def test_a_failing_app_fails_its_own_request_and_waiters_ask_again() -> None:
    calls = 0

    async def flaky(request: Request) -> Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        if calls == 1:
            raise RuntimeError("database went away")
        return Response("ok", headers={"Cache-Control": "max-age=60"})

    origin = Origin({"/": flaky})

    async def scenario() -> None:
        from httpx import ASGITransport, AsyncClient

        transport = ASGITransport(app=origin.app, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url="http://shop.test") as c:
            responses = await asyncio.gather(*[c.get("/") for _ in range(10)])
        codes = sorted(r.status_code for r in responses)
        assert codes.count(500) == 1 and codes.count(200) == 9

    run(scenario())


def test_when_the_core_sheds_load_the_app_is_not_asked_anyway() -> None:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.3)
        return Response("page", headers={"Cache-Control": "max-age=60"})

    cache = Cache(None, jitter=0.0, origin_limit=1, origin_wait=0.05)
    origin = Origin({"/p/{n}": slow}, cache=cache)

    async def scenario() -> None:
        async with origin.client() as c:
            responses = await asyncio.gather(*[c.get(f"/p/{n}") for n in range(5)])
        shed = [r for r in responses if r.status_code == 503]
        assert shed and all(r.headers["retry-after"] == "1" for r in shed)
        assert "detail=overloaded" in shed[0].headers["cache-status"]
        assert origin.n("/p/{n}") == 5 - len(shed)

    run(scenario())


# --- stale responses --------------------------------------------------------------------------


def test_stale_while_revalidate_serves_the_stale_page_while_refreshing() -> None:
    version = 0

    async def page(request: Request) -> Response:
        nonlocal version
        version += 1
        cc = "max-age=10, stale-while-revalidate=30"
        return Response(f"v{version}", headers={"Cache-Control": cc})

    clock = FakeClock()
    origin = Origin({"/": page}, cache=Cache(None, jitter=0.0, clock=clock))

    async def scenario() -> None:
        async with origin.client() as c:
            assert (await c.get("/")).text == "v1"
            clock.advance(15)
            stale = await asyncio.gather(*[c.get("/") for _ in range(20)])
            assert {r.text for r in stale} == {"v1"}
            assert stale[0].headers["cache-status"] == "cachelayer; fwd=stale; ttl=-5"
            assert stale[0].headers["age"] == "15"
            # One background refresh, whose response went to the cache and to no client.
            for _ in range(200):
                if (await c.get("/")).text == "v2":
                    break
                await asyncio.sleep(0.01)
            assert (await c.get("/")).text == "v2" and version == 2

    run(scenario())


def test_a_background_refresh_never_sends_to_the_request_that_triggered_it() -> None:
    version = 0

    async def page(request: Request) -> Response:
        nonlocal version
        version += 1
        return Response(
            f"v{version}", headers={"Cache-Control": "max-age=10, stale-while-revalidate=30"}
        )

    clock = FakeClock()
    origin = Origin({"/": page}, cache=Cache(None, jitter=0.0, clock=clock))

    async def scenario() -> None:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/", "raw_path": b"/",
                 "scheme": "http", "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"shop.test")]}  # fmt: skip
        await call_raw(origin.app, "/")
        clock.advance(15)
        await origin.app(dict(scope), receive, send)
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        for _ in range(200):
            if (await call_raw(origin.app, "/"))[2] == b"v2":
                break
            await asyncio.sleep(0.01)
        assert version == 2 and len(sent) == 2 and sent[1]["body"] == b"v1"

    run(scenario())


@pytest.mark.parametrize("failure", ["503", "raise"])
def test_stale_if_error_serves_the_stale_page_when_the_app_fails(failure: str) -> None:
    healthy = True

    async def page(request: Request) -> Response:
        if not healthy:
            if failure == "raise":
                raise RuntimeError("database went away")
            return Response("down", status_code=503)
        return Response("good", headers={"Cache-Control": "max-age=10, stale-if-error=60"})

    clock = FakeClock()
    origin = Origin({"/": page}, cache=Cache(None, jitter=0.0, clock=clock))

    async def scenario() -> None:
        nonlocal healthy
        transport = httpx.ASGITransport(app=origin.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as c:
            await c.get("/")
            healthy = False
            clock.advance(20)
            r = await c.get("/")
            assert (r.status_code, r.text, r.headers["age"]) == (200, "good", "20")
            assert r.headers["cache-status"].startswith("cachelayer; fwd=stale")
            clock.advance(60)  # past stale-if-error: the failure shows
            assert (await c.get("/")).status_code == 500 if failure == "raise" else 503

    run(scenario())


# --- tags -------------------------------------------------------------------------------------


def test_cache_tags_from_the_response_invalidate_pages_and_their_variants() -> None:
    version = 0

    async def page(request: Request) -> Response:
        nonlocal version
        version += 1
        lang = request.headers.get("accept-language", "-")
        headers = {
            "Cache-Control": "max-age=60",
            "Cache-Tag": "catalog, p1",
            "Vary": "Accept-Language",
        }
        return Response(f"v{version} {lang}", headers=headers)

    async def other(request: Request) -> Response:
        return Response("other", headers={"Cache-Control": "max-age=60", "Cache-Tag": "blog"})

    origin = Origin({"/": page, "/blog": other})

    async def scenario() -> None:
        async with origin.client() as c:
            en, fr = {"Accept-Language": "en"}, {"Accept-Language": "fr"}
            assert (await c.get("/", headers=en)).text == "v1 en"
            assert (await c.get("/", headers=fr)).text == "v2 fr"
            await c.get("/blog")
            await origin.cache.ainvalidate_tags("catalog")
            assert (await c.get("/", headers=fr)).text == "v3 fr"
            assert (await c.get("/", headers=en)).text == "v4 en"
            assert (await c.get("/blog")).headers["cache-status"].startswith("cachelayer; hit")
        assert origin.n("/blog") == 1

    run(scenario())


@pytest.mark.redis
def test_tag_invalidation_reaches_every_process(redis_url: str) -> None:
    version = 0

    async def page(request: Request) -> Response:
        nonlocal version
        version += 1
        return Response(
            f"v{version}", headers={"Cache-Control": "max-age=60", "Cache-Tag": "catalog"}
        )

    caches = [Cache(redis_url, jitter=0.0, namespace="tags") for _ in range(2)]
    a, b = (Origin({"/": page}, cache=cache) for cache in caches)

    async def scenario() -> None:
        async with a.client() as ca, b.client() as cb:
            assert (await ca.get("/")).text == "v1"
            assert (await cb.get("/")).text == "v1"  # from Redis, then in b's L1
            await caches[0].ainvalidate_tags("catalog")
            for _ in range(200):  # b's L1 learns of it over pub/sub
                if (await cb.get("/")).text != "v1":
                    break
                await asyncio.sleep(0.01)
            assert (await cb.get("/")).text == "v2"
        for cache in caches:
            await cache.aclose()

    run(scenario())
