"""The shared cache never hands one user's response to another.

Users A and B (and an anonymous C) meet every way a response can be personalised, both one
after the other and concurrently (so coalescing is on trial too); then cache deception,
poisoning, and hostile headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from test_asgi_helpers import Origin, call_raw, fixed, run

PUBLIC = {"Cache-Control": "public, max-age=60"}  # a careless app caching "everything"


async def slow() -> None:
    await asyncio.sleep(0.02)  # lets concurrent requests overlap in one flight


async def by_authorization(request: Request) -> Response:
    await slow()
    who = request.headers.get("authorization", "nobody")
    return Response(f"page of {who}", headers={"Cache-Control": "max-age=60"})


async def by_cookie(request: Request) -> Response:
    await slow()
    return Response(f"page of {request.cookies.get('user', 'nobody')}", headers=PUBLIC)


async def by_session(request: Request) -> Response:
    await slow()
    if "login" in request.query_params:
        request.session["user"] = request.query_params["login"]
    return Response(f"page of {request.session.get('user', 'nobody')}", headers=PUBLIC)


async def with_set_cookie(request: Request) -> Response:
    await slow()
    who = request.headers.get("x-user", "nobody")
    response = Response(f"welcome {who}", headers=PUBLIC)
    response.set_cookie("session", f"secret-of-{who}")
    return response


async def private_response(request: Request) -> Response:
    await slow()
    who = request.headers.get("x-user", "nobody")
    return Response(f"page of {who}", headers={"Cache-Control": "private, max-age=60"})


async def vary_on_user(request: Request) -> Response:
    await slow()
    who = request.headers.get("x-user", "nobody")
    return Response(f"page of {who}", headers={**PUBLIC, "Vary": "X-User"})


def session_outer(handler: Any) -> Origin:
    return Origin({"/me": handler}, outer=[Middleware(SessionMiddleware, secret_key="k" * 32)])


def session_inner(handler: Any) -> Origin:
    return Origin({"/me": handler}, inner=[Middleware(SessionMiddleware, secret_key="k" * 32)])


CASES: dict[str, tuple[Callable[[Any], Origin], Any, dict[str, str], dict[str, str]]] = {
    "authorization": (
        lambda h: Origin({"/me": h}), by_authorization,
        {"Authorization": "Bearer A"}, {"Authorization": "Bearer B"},
    ),
    "cookie": (lambda h: Origin({"/me": h}), by_cookie, {"Cookie": "user=A"}, {"Cookie": "user=B"}),
    "set-cookie": (lambda h: Origin({"/me": h}), with_set_cookie, {"X-User": "A"}, {"X-User": "B"}),
    "private": (lambda h: Origin({"/me": h}), private_response, {"X-User": "A"}, {"X-User": "B"}),
    "vary": (lambda h: Origin({"/me": h}), vary_on_user, {"X-User": "A"}, {"X-User": "B"}),
}  # fmt: skip


@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "concurrent"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_user_b_never_receives_user_a_response(case: str, concurrent: bool) -> None:
    make, handler, a_headers, b_headers = CASES[case]
    origin = make(handler)

    async def scenario() -> None:
        async with origin.client() as c:
            if concurrent:
                a, b, anon = await asyncio.gather(
                    c.get("/me", headers=a_headers), c.get("/me", headers=b_headers), c.get("/me")
                )
            else:
                a = await c.get("/me", headers=a_headers)
                b = await c.get("/me", headers=b_headers)
                anon = await c.get("/me")
            assert "A" in a.text
            for other in (b, anon):
                assert "A" not in other.text
                assert "secret-of-A" not in other.headers.get("set-cookie", "")
            assert "B" in b.text
            again = await c.get("/me", headers=b_headers)
            assert "A" not in again.text and "secret-of-A" not in str(again.headers)

    run(scenario())


@pytest.mark.parametrize("make", [session_outer, session_inner], ids=["outer", "inner"])
def test_session_read_inside_the_handler_is_never_shared(make: Callable[[Any], Origin]) -> None:
    origin = make(by_session)

    async def scenario() -> None:
        async with origin.client() as a, origin.client() as b, origin.client() as anon:
            assert (await a.get("/me?login=A")).text == "page of A"
            assert (await a.get("/me")).text == "page of A"
            await b.get("/me?login=B")
            assert (await b.get("/me")).text == "page of B"
            assert (await anon.get("/me")).text == "page of nobody"
            assert (await b.get("/me")).text == "page of B"

    run(scenario())


def test_private_key_caches_per_principal_and_never_across() -> None:
    def principal(scope: Any) -> str | None:
        cookies = dict(h for h in scope["headers"] if h[0] == b"cookie")
        cookie = cookies.get(b"cookie", b"").decode()
        return cookie.removeprefix("sid=") if cookie.startswith("sid=") else None

    async def cart(request: Request) -> Response:
        await slow()
        sid = request.cookies.get("sid")
        return Response(f"cart of {sid}", headers={"Cache-Control": "private, max-age=60"})

    origin = Origin({"/cart": cart}, private_key=principal)

    async def scenario() -> None:
        async with origin.client() as c:
            a = {"Cookie": "sid=A"}
            b = {"Cookie": "sid=B"}
            results = await asyncio.gather(*[c.get("/cart", headers=a) for _ in range(20)])
            assert {r.text for r in results} == {"cart of A"}
            assert origin.n("/cart") == 1
            assert (await c.get("/cart", headers=b)).text == "cart of B"
            assert (await c.get("/cart", headers=a)).text == "cart of A"
            assert (await c.get("/cart", headers=b)).text == "cart of B"
            assert origin.n("/cart") == 2
            anon = await c.get("/cart")  # private_key said None: not cached at all
            assert anon.text == "cart of None" and "bypass" in anon.headers["cache-status"]

    run(scenario())


# --- cache deception --------------------------------------------------------------------------


async def account(request: Request) -> Response:
    who = request.cookies.get("user", "nobody")
    return Response(f"settings of {who}", media_type="text/css", headers=PUBLIC)


@pytest.mark.parametrize(
    "url", ["/account/settings.css", "/account;x.css", "/account/settings.css?x=.css"]
)
def test_cache_deception_paths_do_not_store_a_victims_page(url: str) -> None:
    origin = Origin({"/account": account, "/account/{rest:path}": account})

    async def scenario() -> None:
        async with origin.client() as c:
            victim = await c.get(url, headers={"Cookie": "user=victim"})
            attacker = await c.get(url)
            assert "victim" not in attacker.text
            assert "victim" in victim.text or victim.status_code == 404

    run(scenario())


@pytest.mark.parametrize(
    ("path", "raw_path"),
    [
        ("/account/settings.css", b"/account%2Fsettings.css"),
        ("/static/../account", b"/static/../account"),
        ("/static/./account", b"/static/./account"),
        ("/account\\settings.css", b"/account%5Csettings.css"),
    ],
)
def test_ambiguous_paths_go_around_the_cache(path: str, raw_path: bytes) -> None:
    origin = Origin({"/{rest:path}": fixed("page", cache_control="public, max-age=60")})

    async def scenario() -> None:
        for _ in range(2):
            _, headers, _ = await call_raw(origin.app, path, raw_path=raw_path)
            assert headers[b"cache-status"] == b"cachelayer; fwd=bypass; detail=uri"
        assert origin.n("/{rest:path}") == 2

    run(scenario())


def test_a_path_cannot_collide_with_a_path_plus_query() -> None:
    async def echo(request: Request) -> Response:
        return Response(f"{request.scope['path']}|{request.url.query}", headers=PUBLIC)

    origin = Origin({"/{rest:path}": echo})

    async def scenario() -> None:
        async with origin.client() as c:
            first = await c.get("/a%3Fb")  # path "/a?b", no query
            second = await c.get("/a?b")  # path "/a", query "b"
            assert first.text == "/a?b|" and second.text == "/a|b"

    run(scenario())


# --- poisoning --------------------------------------------------------------------------------


async def links(request: Request) -> Response:
    host = request.headers.get("x-forwarded-host") or request.headers["host"]
    return Response(f'<a href="https://{host}/cart">cart</a>', headers=PUBLIC)


def test_untrusted_forwarded_host_is_never_stored() -> None:
    origin = Origin({"/": links})

    async def scenario() -> None:
        async with origin.client() as c:
            evil = await c.get("/", headers={"X-Forwarded-Host": "evil.example"})
            assert "evil.example" in evil.text  # the app said so, to the attacker only
            assert "detail=forwarded" in evil.headers["cache-status"]
            victim = await c.get("/")
            assert "evil.example" not in victim.text

    run(scenario())


def test_trusted_forwarded_host_is_part_of_the_key() -> None:
    origin = Origin({"/": links}, trusted_forwarded_headers=["X-Forwarded-Host"])

    async def scenario() -> None:
        async with origin.client() as c:
            await c.get("/", headers={"X-Forwarded-Host": "evil.example"})
            victim = await c.get("/")
            assert "evil.example" not in victim.text
            assert (await c.get("/")).headers["cache-status"].startswith("cachelayer; hit")

    run(scenario())


def test_host_header_is_keyed_and_an_allow_list_sends_others_around() -> None:
    origin = Origin({"/": links})
    guarded = Origin({"/": links}, hosts=["shop.test"])

    async def scenario() -> None:
        for o in (origin, guarded):
            async with o.client() as c:
                await c.get("/", headers={"Host": "evil.example"})
                assert "evil.example" not in (await c.get("/")).text
        async with guarded.client() as c:
            r = await c.get("/", headers={"Host": "evil.example"})
            assert "detail=uri" in r.headers["cache-status"]

    run(scenario())


async def reflect(request: Request) -> Response:
    return Response(f"page {sorted(request.query_params.multi_items())}", headers=PUBLIC)


def test_unkeyed_query_parameters_never_reach_the_app() -> None:
    from cachelayer.asgi import Rule

    origin = Origin({"/p": reflect}, rules=[Rule("/p", query_exclude=["utm_source"])])

    async def scenario() -> None:
        async with origin.client() as c:
            evil = await c.get("/p", params={"utm_source": "<script>", "id": "1"})
            assert "<script>" not in evil.text
            victim = await c.get("/p", params={"id": "1"})
            assert "<script>" not in victim.text and origin.n("/p") == 1

    run(scenario())


def test_query_parameters_are_keyed_sorted_and_the_app_sees_the_keyed_form() -> None:
    origin = Origin({"/p": reflect})

    async def scenario() -> None:
        async with origin.client() as c:
            a = await c.get("/p?b=2&a=1&a=0")
            b = await c.get("/p?a=1&b=2&a=0")
            evil = await c.get("/p?a=1&b=2&a=0&x=<script>")
            assert a.text == b.text and origin.n("/p") == 2
            assert "<script>" in evil.text and "<script>" not in (await c.get("/p?a=1")).text

    run(scenario())


# --- hostile headers --------------------------------------------------------------------------


HOSTILE_REQUEST = [
    [(b"cache-control", b"max-age=" + b"9" * 10_000)],
    [(b"cache-control", b'no-cache="unterminated')],
    [(b"cache-control", "max-age=\u00e9".encode())],
    [(b"if-none-match", b"\xff\xfe\x00garbage")],
    [(b"if-modified-since", b"Sat, 99 Foo 20000 99:99:99 GMT")],
    [(b"accept-language", b"\xff" * 100_000)],
    [(b"host", b"\xff\xfe")],
    [(b"host", b"a" * 10_000)],
    [(b"x-user", b"\x00\x01\x02")],
]


@pytest.mark.parametrize("headers", HOSTILE_REQUEST)
def test_hostile_request_headers_never_raise(headers: list[tuple[bytes, bytes]]) -> None:
    origin = Origin({"/": fixed("ok", cache_control="public, max-age=60", vary="Accept-Language")})

    async def scenario() -> None:
        for _ in range(2):
            status, _, body = await call_raw(origin.app, "/", headers=headers)
            assert (status, body) == (200, b"ok")

    run(scenario())


HOSTILE_RESPONSE = [
    "max-age=60, max-age=120",
    "max-age=-1",
    "max-age=abc",
    'max-age=60, private="unterminated',
    "s-maxage=1e3",
    ",,,;;;===",
    "max-age=" + "9" * 5000,
]


@pytest.mark.parametrize("value", HOSTILE_RESPONSE)
def test_garbage_response_cache_control_is_not_stored(value: str) -> None:
    origin = Origin({"/": fixed("ok", cache_control=value)})

    async def scenario() -> None:
        async with origin.client() as c:
            for _ in range(2):
                assert (await c.get("/")).text == "ok"
        assert origin.n("/") == 2

    run(scenario())


def test_non_latin1_response_headers_pass_through_unstored() -> None:
    async def handler(request: Request) -> Response:
        r = Response("ok")
        r.raw_headers.append((b"cache-control", "max-age=60, é".encode()))
        r.raw_headers.append((b"vary", b"\xff"))
        return r

    origin = Origin({"/": handler})

    async def scenario() -> None:
        for _ in range(2):
            status, _, body = await call_raw(origin.app, "/")
            assert (status, body) == (200, b"ok")
        assert origin.n("/") == 2

    run(scenario())


def test_no_query_can_spell_the_key_of_a_forwarded_or_variant_entry() -> None:
    import hashlib

    origin = Origin({"/": links}, trusted_forwarded_headers=["X-Forwarded-Host"])
    digest = hashlib.blake2b(b"x-forwarded-host=evil.example", digest_size=16).hexdigest()

    async def scenario() -> None:
        async with origin.client() as c:
            await c.get("/?x=1", headers={"X-Forwarded-Host": "evil.example"})
            for crafted in (f"/?x=1|{digest}", f"/?x=1:{digest}", f"/?x=1#{digest}:p"):
                r = await c.get(crafted.replace("#", "%23"))
                assert "evil.example" not in r.text

    run(scenario())


def test_an_authorised_waiter_is_not_served_an_anonymous_leaders_page() -> None:
    origin = Origin({"/me": by_authorization})  # "max-age=60": storable, but not for Authorization

    async def scenario() -> None:
        async with origin.client() as c:
            anon, authed = await asyncio.gather(
                c.get("/me"), c.get("/me", headers={"Authorization": "Bearer X"})
            )
            assert anon.text == "page of nobody" and authed.text == "page of Bearer X"
            assert "authorization" in authed.headers["cache-status"]
            again = await c.get("/me", headers={"Authorization": "Bearer Y"})
            assert again.text == "page of Bearer Y"
        assert origin.n("/me") == 3

    run(scenario())
