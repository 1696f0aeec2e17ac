"""RFC 9111 behaviour of CacheMiddleware: what is stored, for how long, and how it is reused."""

from __future__ import annotations

import email.utils
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi import Response as FastAPIResponse
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from test_asgi_helpers import Origin, call_raw, fixed, run

from cachelayer import Cache
from cachelayer.asgi import CacheMiddleware, Rule
from cachelayer.testing import FakeClock

NOW = 1_700_000_000.0


def http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


# (response headers, status, stored?) -- "stored" means the second request does not reach the app
MATRIX: list[tuple[dict[str, str], int, bool]] = [
    ({"Cache-Control": "max-age=60"}, 200, True),
    ({"Cache-Control": "s-maxage=60"}, 200, True),
    ({"Cache-Control": "public, max-age=60"}, 200, True),
    ({"Cache-Control": "MAX-AGE=60"}, 200, True),
    ({"Cache-Control": 'max-age="60"'}, 200, True),
    ({"Cache-Control": "  max-age = 60 ,, "}, 200, True),
    ({"Cache-Control": 'max-age=60, unknown-extension="x, y"'}, 200, True),
    ({"Cache-Control": 'max-age=60, private="X-User"', "X-User": "A"}, 200, True),
    ({"Expires": http_date(NOW + 60)}, 200, True),
    ({"Cache-Control": "max-age=60"}, 404, True),
    ({"Cache-Control": "max-age=60"}, 301, True),
    ({"Cache-Control": "max-age=60"}, 204, True),
    ({}, 200, False),
    ({"Cache-Control": "no-store, max-age=60"}, 200, False),
    ({"Cache-Control": "private"}, 200, False),
    ({"Cache-Control": "private, max-age=60"}, 200, False),
    ({"Cache-Control": "no-cache, max-age=60"}, 200, False),
    ({"Cache-Control": "max-age=0"}, 200, False),
    ({"Cache-Control": "s-maxage=0, max-age=60"}, 200, False),
    ({"Cache-Control": "max-age=60", "Age": "60"}, 200, False),
    ({"Expires": "0"}, 200, False),
    ({"Expires": http_date(NOW - 60)}, 200, False),
    ({"Cache-Control": "max-age=60", "Vary": "*"}, 200, False),
    ({"Cache-Control": "max-age=60", "Set-Cookie": "a=b"}, 200, False),
    ({"Cache-Control": "max-age=60"}, 500, False),
    ({"Cache-Control": "max-age=60"}, 302, False),
    ({"Cache-Control": "max-age=60", "Content-Range": "bytes 0-1/10"}, 206, False),
]


@pytest.mark.parametrize(("headers", "status", "stored"), MATRIX)
def test_storability_matrix(headers: dict[str, str], status: int, stored: bool) -> None:
    origin = Origin(
        {"/": fixed("body", status, **{k.replace("-", "_"): v for k, v in headers.items()})}
    )
    origin.clock.set(NOW)

    async def scenario() -> None:
        async with origin.client() as c:
            first, second = await c.get("/"), await c.get("/")
            assert first.status_code == second.status_code == status
        assert origin.n("/") == (1 if stored else 2)
        if stored and "X-User" in headers:
            assert "x-user" not in second.headers  # private="X-User" strips the field only

    run(scenario())


def test_default_ttl_and_rules_give_freshness_to_responses_without_it() -> None:
    origin = Origin(
        {"/a": fixed("a"), "/b/x": fixed("b"), "/c": fixed("c")},
        default_ttl=30,
        rules=[Rule("/b/*", ttl=5), Rule("/c", cache=False)],
    )

    async def scenario() -> None:
        async with origin.client() as c:
            for _ in range(2):
                await c.get("/a"), await c.get("/b/x"), await c.get("/c")
            origin.clock.advance(10)
            await c.get("/a"), await c.get("/b/x")
        assert (origin.n("/a"), origin.n("/b/x"), origin.n("/c")) == (1, 2, 2)

    run(scenario())


def test_freshness_age_and_expiry_follow_the_cache_clock() -> None:
    origin = Origin({"/": fixed("x", cache_control="max-age=60")})

    async def scenario() -> None:
        async with origin.client() as c:
            miss = await c.get("/")
            assert miss.headers["cache-status"] == "cachelayer; fwd=uri-miss; stored"
            assert "age" not in miss.headers
            origin.clock.advance(59)
            hit = await c.get("/")
            assert hit.headers["age"] == "59"
            assert hit.headers["cache-status"] == "cachelayer; hit; ttl=1"
            origin.clock.advance(2)
            again = await c.get("/")
            assert again.headers["cache-status"].startswith("cachelayer; fwd=uri-miss")
        assert origin.n("/") == 2

    run(scenario())


def test_age_from_the_app_counts_against_freshness() -> None:
    origin = Origin({"/": fixed("x", cache_control="max-age=60", age="50")})

    async def scenario() -> None:
        async with origin.client() as c:
            await c.get("/")
            origin.clock.advance(5)
            assert (await c.get("/")).headers["age"] == "55"
            origin.clock.advance(6)
            await c.get("/")
        assert origin.n("/") == 2

    run(scenario())


def test_jitter_never_stretches_http_freshness() -> None:
    import random

    clock = FakeClock()
    cache = Cache(None, jitter=0.5, clock=clock, rng=random.Random(7))
    origin = Origin({"/p{n}": fixed("x", cache_control="max-age=100")}, cache=cache)

    async def scenario() -> None:
        async with origin.client() as c:
            for n in range(20):
                await c.get(f"/p{n}")
            clock.advance(100)
            for n in range(20):
                assert "hit" not in (await c.get(f"/p{n}")).headers["cache-status"]

    run(scenario())


def test_head_is_answered_from_the_get_entry() -> None:
    origin = Origin({"/": fixed("twelve bytes", cache_control="max-age=60")})

    async def scenario() -> None:
        async with origin.client() as c:
            head_first = await c.head("/")  # a HEAD miss never fills the entry
            assert head_first.headers["cache-status"] == "cachelayer; fwd=uri-miss"
            get = await c.get("/")
            head = await c.head("/")
            assert head.content == b"" and head.headers["content-length"] == "12"
            assert head.headers["etag"] == get.headers["etag"]
            assert head.headers["cache-status"].startswith("cachelayer; hit")
        assert origin.n("/") == 2

    run(scenario())


def test_derived_etag_is_strong_stable_and_answers_if_none_match() -> None:
    made = [Origin({"/": fixed("same body", cache_control="max-age=60")}) for _ in range(2)]

    async def scenario() -> None:
        async with made[0].client() as c0, made[1].client() as c1:
            etag = (await c0.get("/")).headers["etag"]
            assert etag.startswith('"') and not etag.startswith("W/")
            # Another process (another cache, cold) derives the same validator and answers
            # the client's conditional request on the very first miss.
            cold = await c1.get("/", headers={"If-None-Match": etag})
            assert cold.status_code == 304 and cold.content == b""
            for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
                r = await c0.get("/", headers={"If-None-Match": value})
                assert r.status_code == 304 and r.headers["etag"] == etag
                assert r.headers["cache-status"].startswith("cachelayer; hit")
            r = await c0.get("/", headers={"If-None-Match": '"other"'})
            assert r.status_code == 200 and r.text == "same body"
        assert made[0].n("/") == 1

    run(scenario())


def test_app_etag_is_kept() -> None:
    origin = Origin({"/": fixed("b", cache_control="max-age=60", etag='W/"v1"')})

    async def scenario() -> None:
        async with origin.client() as c:
            assert (await c.get("/")).headers["etag"] == 'W/"v1"'
            r = await c.get("/", headers={"If-None-Match": '"v1"'})
            assert r.status_code == 304

    run(scenario())


def test_if_modified_since_is_answered_from_the_cache() -> None:
    lm = NOW - 3600
    origin = Origin({"/": fixed("b", cache_control="max-age=60", last_modified=http_date(lm))})

    async def scenario() -> None:
        async with origin.client() as c:
            await c.get("/")
            r = await c.get("/", headers={"If-Modified-Since": http_date(lm)})
            assert r.status_code == 304
            r = await c.get("/", headers={"If-Modified-Since": http_date(lm - 1)})
            assert r.status_code == 200 and r.text == "b"
            r = await c.get("/", headers={"If-Modified-Since": "garbage"})
            assert r.status_code == 200
        assert origin.n("/") == 1

    run(scenario())


def test_vary_keeps_variants_apart_and_normalises_values() -> None:
    async def lang(request: Request) -> Response:
        value = request.headers.get("accept-language")
        return Response(
            f"lang={value}", headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"}
        )

    origin = Origin({"/": lang})

    async def scenario() -> None:
        async with origin.client() as c:

            async def get(value: str | None) -> str:
                headers = {} if value is None else {"Accept-Language": value}
                return (await c.get("/", headers=headers)).text

            assert await get("en") == "lang=en"
            assert await get("fr") == "lang=fr"
            assert await get("en") == "lang=en"
            assert await get("EN") == "lang=en"  # case-insensitive field: same variant
            assert await get("fr, de") == "lang=fr, de"
            assert await get("fr,de") == "lang=fr, de"
            assert await get(None) == "lang=None"
            assert await get("") == "lang="  # empty is not absent
            assert await get(None) == "lang=None"
        assert origin.n("/") == 5

    run(scenario())


def test_variants_per_url_are_bounded() -> None:
    async def lang(request: Request) -> Response:
        return Response("x", headers={"Cache-Control": "max-age=60", "Vary": "X-Junk"})

    origin = Origin({"/": lang}, max_variants=3)

    async def scenario() -> None:
        async with origin.client() as c:
            for _round in range(2):
                for n in range(8):
                    await c.get("/", headers={"X-Junk": str(n)})
        # value 0 lives in the primary entry, 1..3 are variants, 4..7 are never stored
        assert origin.n("/") == 8 + 4

    run(scenario())


def test_unsafe_methods_invalidate_on_success_only() -> None:
    state = {"v": 1}

    async def item(request: Request) -> Response:
        if request.method == "POST":
            state["v"] += 1
            return Response("ok", headers={"Location": "/other"})
        if request.method == "PUT":
            return Response("nope", status_code=409)
        return Response(f"v{state['v']}", headers={"Cache-Control": "max-age=60", "Vary": "X-A"})

    origin = Origin({"/item": item, "/other": item})

    async def scenario() -> None:
        async with origin.client() as c:
            assert (await c.get("/item")).text == "v1"
            assert (await c.get("/item", headers={"X-A": "1"})).text == "v1"
            assert (await c.get("/other")).text == "v1"
            assert (await c.put("/item")).headers["cache-status"] == "cachelayer; fwd=method"
            assert (await c.get("/item")).headers["cache-status"].startswith("cachelayer; hit")
            await c.post("/item")
            assert (await c.get("/item")).text == "v2"
            assert (await c.get("/item", headers={"X-A": "1"})).text == "v2"  # variants too
            assert (await c.get("/other")).text == "v2"  # Location, same origin
            await c.delete("/item")
            assert "fwd=uri-miss" in (await c.get("/item")).headers["cache-status"]

    run(scenario())


def test_client_no_cache_does_not_bypass_unless_allowed() -> None:
    closed = Origin({"/": fixed("x", cache_control="max-age=60")})
    opened = Origin({"/": fixed("x", cache_control="max-age=60")}, allow_client_no_cache=True)

    async def scenario() -> None:
        for origin in (closed, opened):
            async with origin.client() as c:
                await c.get("/")
                for h in ({"Cache-Control": "no-cache"}, {"Pragma": "no-cache"},
                          {"Cache-Control": "max-age=0"}):  # fmt: skip
                    await c.get("/", headers=h)
        assert closed.n("/") == 1 and opened.n("/") == 4

    run(scenario())


def test_only_if_cached_and_request_no_store() -> None:
    origin = Origin({"/": fixed("x", cache_control="max-age=60")})

    async def scenario() -> None:
        async with origin.client() as c:
            r = await c.get("/", headers={"Cache-Control": "only-if-cached"})
            assert r.status_code == 504 and origin.n("/") == 0
            await c.get("/", headers={"Cache-Control": "no-store"})  # not stored
            await c.get("/")
            r = await c.get("/", headers={"Cache-Control": "no-store"})  # may be answered
            assert r.headers["cache-status"].startswith("cachelayer; hit")
        assert origin.n("/") == 2

    run(scenario())


def test_range_and_validators_the_cache_cannot_judge_go_to_the_app() -> None:
    origin = Origin({"/": fixed("x", cache_control="max-age=60")})

    async def scenario() -> None:
        async with origin.client() as c:
            await c.get("/")
            for h in ({"Range": "bytes=0-0"}, {"If-Match": '"a"'}):
                r = await c.get("/", headers=h)
                assert "fwd=bypass" in r.headers["cache-status"]
        assert origin.n("/") == 3

    run(scenario())


def test_bodies_over_the_cap_are_not_stored() -> None:
    origin = Origin({"/": fixed("x" * 100, cache_control="max-age=60")}, max_body_size=99)

    async def scenario() -> None:
        async with origin.client() as c:
            for _ in range(2):
                assert len((await c.get("/")).content) == 100
        assert origin.n("/") == 2

    run(scenario())


def test_streams_pass_through_without_buffering_and_big_ones_are_not_stored() -> None:
    import asyncio

    release = asyncio.Event()

    async def stream(request: Request) -> Response:
        async def chunks() -> Any:
            yield b"a" * 60
            await release.wait()
            yield b"b" * 60

        return StreamingResponse(chunks(), headers={"Cache-Control": "max-age=60"})

    origin = Origin({"/": stream}, max_body_size=100)

    async def scenario() -> None:
        sent: list[dict[str, Any]] = []
        first_chunk = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message.get("body"):
                first_chunk.set()

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()
            return {}

        scope = {"type": "http", "method": "GET", "path": "/", "raw_path": b"/",
                 "query_string": b"", "headers": [(b"host", b"x")], "scheme": "http",
                 "root_path": "", "asgi": {"version": "3.0", "spec_version": "2.4"}}  # fmt: skip
        task = asyncio.create_task(origin.app(scope, receive, send))
        await asyncio.wait_for(first_chunk.wait(), 5)  # delivered before the stream ends
        assert sent[0]["type"] == "http.response.start" and sent[1]["body"] == b"a" * 60
        release.set()
        await asyncio.wait_for(task, 5)
        _, _, body = await call_raw(origin.app, "/", headers=[])
        assert body == b"a" * 60 + b"b" * 60
        assert origin.n("/") == 2

    run(scenario())


def test_lifespan_and_websocket_scopes_are_untouched() -> None:
    seen: list[Any] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    mw = CacheMiddleware(inner, cache=Cache(None))

    async def receive() -> dict[str, Any]:
        return {}

    async def send(message: Any) -> None:
        pass

    async def scenario() -> None:
        for scope in ({"type": "lifespan"}, {"type": "websocket", "path": "/ws", "headers": []}):
            await mw(scope, receive, send)
            assert seen[-1] == (scope, receive, send) and seen[-1][0] is scope

    run(scenario())


def test_works_with_fastapi_unchanged() -> None:
    cache = Cache(None, jitter=0.0)
    app = FastAPI()
    app.add_middleware(CacheMiddleware, cache=cache)
    calls = []

    @app.get("/items/{item_id}")
    async def read_item(item_id: int, response: FastAPIResponse) -> dict[str, Any]:
        calls.append(item_id)
        response.headers["Cache-Control"] = "public, max-age=60"
        return {"id": item_id}

    async def scenario() -> None:
        import httpx

        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            a, b = await c.get("/items/3"), await c.get("/items/3")
            assert a.json() == b.json() == {"id": 3}
            assert b.headers["cache-status"].startswith("cachelayer; hit")
        assert calls == [3]

    run(scenario())


def test_cache_tag_header_is_stripped_from_every_response() -> None:
    origin = Origin({"/": fixed("x", cache_control="max-age=60", cache_tag="catalog p1")})

    async def scenario() -> None:
        async with origin.client() as c:
            for _ in range(2):
                assert "cache-tag" not in (await c.get("/")).headers

    run(scenario())


@pytest.mark.redis
def test_entries_are_shared_through_redis_across_processes(redis_url: str) -> None:
    clock = FakeClock()
    caches = [Cache(redis_url, jitter=0.0, clock=clock, namespace="asgi") for _ in range(2)]
    origins = [Origin({"/": fixed("shared", cache_control="max-age=60")}, cache=c) for c in caches]

    async def scenario() -> None:
        async with origins[0].client() as c0, origins[1].client() as c1:
            etag = (await c0.get("/")).headers["etag"]
            clock.advance(7)
            r = await c1.get("/")
            assert r.text == "shared" and r.headers["age"] == "7" and r.headers["etag"] == etag
            assert (await c1.get("/", headers={"If-None-Match": etag})).status_code == 304
        assert (origins[0].n("/"), origins[1].n("/")) == (1, 0)
        for cache in caches:
            await cache.aclose()

    run(scenario())


def test_file_responses_are_served_unharmed_and_small_ones_stored(tmp_path: Any) -> None:
    from starlette.responses import FileResponse

    small = tmp_path / "small.txt"
    small.write_bytes(b"s" * 1000)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, over a 100 KB cap

    async def serve(request: Request) -> Response:
        path = small if request.path_params["name"] == "small" else big
        return FileResponse(path, headers={"Cache-Control": "max-age=60"})

    origin = Origin({"/files/{name}": serve}, max_body_size=100_000)

    async def scenario() -> None:
        async with origin.client() as c:
            for _ in range(2):
                assert (await c.get("/files/small")).content == small.read_bytes()
                assert (await c.get("/files/big")).content == big.read_bytes()
        assert origin.n("/files/{name}") == 3  # small once, big twice

    run(scenario())


def test_a_hit_for_miss_marker_is_replaced_once_the_url_becomes_cacheable() -> None:
    cacheable = False

    async def page(request: Request) -> Response:
        cc = "max-age=60" if cacheable else "no-store"
        return Response("x", headers={"Cache-Control": cc})

    origin = Origin({"/": page})

    async def scenario() -> None:
        nonlocal cacheable
        async with origin.client() as c:
            await c.get("/")
            cacheable = True
            r = await c.get("/")
            assert (
                r.headers["cache-status"] == "cachelayer; fwd=uri-miss; detail=hit-for-miss; stored"
            )
            assert (await c.get("/")).headers["cache-status"].startswith("cachelayer; hit")
        assert origin.n("/") == 2

    run(scenario())


def test_bad_configuration_is_refused() -> None:
    from cachelayer import ConfigurationError

    for kwargs in (
        {"default_ttl": -1},
        {"statuses": [200, 206]},
        {"max_body_size": 0},
        {"private_key": "sid"},
        {"rules": ["/x"]},
    ):
        with pytest.raises(ConfigurationError):
            CacheMiddleware(lambda *a: None, cache=Cache(None), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Rule("no-slash")


def test_the_middleware_module_needs_no_starlette() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['starlette'] = None; import cachelayer.asgi; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "foreign",
    [["R", 200, [], b"old layout"], ["R1", 200], "text", {"R1": 1}, ["X"], [], None],
)
def test_values_of_another_version_or_shape_are_a_miss(foreign: Any) -> None:
    origin = Origin({"/": fixed("fresh", cache_control="max-age=60")})

    async def scenario() -> None:
        async with origin.client() as c:
            await c.get("/")
            # whatever sits under the key, the middleware answers from the app, not garbage
            key = next(iter(origin.cache._l1.data))
            await origin.cache.aset(key, foreign)
            r = await c.get("/")
            assert (r.status_code, r.text) == (200, "fresh")
            assert (await c.get("/")).headers["cache-status"].startswith("cachelayer; hit")

    run(scenario())
