"""The response side of the ASGI cache: may this response be stored, for how long, and how a
stored response is answered again (hit, 304, HEAD).

A stored response is a plain list (msgpack-friendly, cheap to index on the hit path)::

    ["R1", status, headers, body, stored_at, lifetime, age0, etag, last_modified,
     vary_names, vary_digest, gen, auth_ok, swr, sie]

``swr`` and ``sie`` are the response's stale-while-revalidate and stale-if-error windows; the
core keeps the entry for the larger of the two past its freshness.

``["M"]`` is a hit-for-miss marker (this URL answered with something uncacheable, so do not
queue requests behind each other for it) and ``["P"]`` is handed to coalesced waiters, never
stored, when the leader's response may not be shared: each waiter then asks the app itself.
"""

from __future__ import annotations

from typing import Any

from ._http_headers import (
    body_etag,
    delta_seconds,
    field_names,
    opaque_etag,
    parse_cache_control,
    parse_http_date,
    parse_tags,
    parse_vary,
)
from ._http_request import Headers, Request
from ._http_settings import Settings

# The layout's version is in the kind: a process of another version reads a miss, not garbage.
REC, MARK, PASS = "R1", "M", "P"
MARKER: list[Any] = [MARK]
PASS_VALUE: list[Any] = [PASS]
(
    _KIND,
    STATUS,
    HEADERS,
    BODY,
    STORED_AT,
    LIFETIME,
    AGE0,
    ETAG,
    LAST_MODIFIED,
    VARY_NAMES,
    VARY_DIGEST,
    GEN,
    AUTH_OK,
    SWR,
    SIE,
) = range(15)

# Never stored, never replayed: they describe one connection or one delivery, not the page.
_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
    | {b"te", b"trailer", b"date", b"age", b"cache-status", b"set-cookie"}
)
# RFC 9110 §15.4.5: the fields a 304 carries over from the 200 it stands for.
_NOT_MODIFIED_FIELDS = frozenset(
    {b"cache-control", b"content-location", b"etag", b"expires", b"vary", b"last-modified"}
)
# Statuses a hit-for-miss marker is not written for: they say something about this moment
# (overload, a failed precondition), not about the URL.
_TRANSIENT = frozenset({304, 408, 412, 425, 429})
MAX_VARY = 8
RECORD_LEN = 15


def kind_of(value: Any) -> str | None:
    """REC, MARK or PASS for values this version wrote; None for anything else (a miss)."""
    if type(value) is not list or not value:
        return None
    kind = value[0]
    if kind == REC:
        return REC if len(value) == RECORD_LEN else None
    return kind if kind in (MARK, PASS) else None


class Plan:
    """What the headers of a response decided: a store is possible, pending its body."""

    __slots__ = (
        "age0",
        "auth_ok",
        "content_length",
        "etag",
        "headers",
        "last_modified",
        "lifetime",
        "sie",
        "status",
        "swr",
        "tags",
        "vary",
    )

    def __init__(self, status: int) -> None:
        self.status = status
        self.headers: list[list[bytes]] = []
        self.lifetime = 0.0
        self.age0 = 0.0
        self.swr = 0.0
        self.sie = 0.0
        self.tags: tuple[str, ...] = ()
        self.vary: tuple[str, ...] = ()
        self.etag: bytes | None = None
        self.last_modified: float | None = None
        self.content_length: int | None = None
        self.auth_ok = False


class NotStored:
    """Why a response is not stored, and whether that is a property of the URL (marker)."""

    __slots__ = ("mark", "reason")

    def __init__(self, reason: str, mark: bool) -> None:
        self.reason = reason
        self.mark = mark


def plan_response(
    settings: Settings, req: Request, status: int, headers: Headers, now: float
) -> Plan | NotStored:
    """Decide from status and headers alone whether the response can be stored."""
    if status not in settings.statuses:
        return NotStored("status", mark=status < 500 and status not in _TRANSIENT)
    lines: dict[bytes, list[bytes]] = {}
    plan = Plan(status)
    for name, value in headers:
        name = name.lower()
        if name == b"set-cookie":
            return NotStored("set-cookie", mark=True)
        lines.setdefault(name, []).append(value)
        if name not in _HOP and name != settings.tags_header:
            plan.headers.append([name, value])
    cc = parse_cache_control(b",".join(lines.get(b"cache-control", [])))
    if cc is None:
        return NotStored("cache-control", mark=True)
    shared = req.shared
    if "no-store" in cc or ("private" in cc and shared and cc["private"] is None):
        return NotStored("no-store" if "no-store" in cc else "private", mark=True)
    if "no-cache" in cc and cc["no-cache"] is None:
        return NotStored("no-cache", mark=True)  # would need revalidation on every use
    strip: set[bytes] = set()
    for directive in ("no-cache", "private") if shared else ("no-cache",):
        names = field_names(cc.get(directive))
        if names is None:
            return NotStored("cache-control", mark=True)
        strip.update(n.encode("ascii") for n in names)
    if strip:
        plan.headers = [h for h in plan.headers if h[0] not in strip]
    vary = parse_vary(b",".join(lines[b"vary"])) if b"vary" in lines else ()
    if vary is None or vary == ("*",) or len(vary) > MAX_VARY:
        return NotStored("vary", mark=True)
    plan.vary = tuple(sorted(set(vary)))
    plan.auth_ok = "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
    if req.auth and not plan.auth_ok:
        return NotStored("authorization", mark=False)
    lifetime = _lifetime(settings, req, cc, lines, shared, now)
    if lifetime is None:
        return NotStored("freshness", mark=True)
    age0 = delta_seconds(_one(lines.get(b"age"))) or 0
    if lifetime - age0 <= 0:
        return NotStored("stale", mark=True)
    plan.lifetime, plan.age0 = float(lifetime), float(age0)
    if "must-revalidate" not in cc and not (shared and "proxy-revalidate" in cc):
        rule = req.rule
        swr: float | None = delta_seconds(cc.get("stale-while-revalidate"))
        sie: float | None = delta_seconds(cc.get("stale-if-error"))
        if swr is None:
            swr = rule.stale_while_revalidate or settings.swr
        if sie is None:
            sie = rule.stale_if_error or settings.sie
        plan.swr, plan.sie = float(swr), float(sie)
    if settings.tags_header is not None and settings.tags_header in lines:
        tags = parse_tags(b",".join(lines[settings.tags_header]))
        if tags is None:
            return NotStored("tags", mark=False)
        plan.tags = tags
    if b"etag" in lines:
        plan.etag = opaque_etag(b",".join(lines[b"etag"]))
    if b"last-modified" in lines:
        plan.last_modified = parse_http_date(lines[b"last-modified"][0])
    if b"content-length" in lines:
        length = delta_seconds(_one(lines[b"content-length"]))
        if length is None:
            return NotStored("content-length", mark=False)
        if length > settings.max_body_size:
            return NotStored("too-large", mark=True)
        plan.content_length = length
    return plan


def _one(values: list[bytes] | None) -> str | None:
    if not values or len(values) != 1 or not values[0].isascii():
        return None
    return values[0].decode("ascii").strip()


def _lifetime(
    settings: Settings,
    req: Request,
    cc: dict[str, str | None],
    lines: dict[bytes, list[bytes]],
    shared: bool,
    now: float,
) -> float | None:
    """RFC 9111 §4.2.1: s-maxage (shared caches only), max-age, Expires - Date; then the
    configured defaults. None means "not storable" (including a malformed directive)."""
    for directive in ("s-maxage", "max-age") if shared else ("max-age",):
        if directive in cc:
            return delta_seconds(cc[directive])
    if b"expires" in lines:
        expires = parse_http_date(lines[b"expires"][0]) if len(lines[b"expires"]) == 1 else None
        if expires is None:
            return None  # an invalid Expires means "already expired"
        date = parse_http_date(lines[b"date"][0]) if b"date" in lines else None
        return max(0.0, expires - (now if date is None else date))
    if req.rule.ttl is not None:
        return req.rule.ttl
    return settings.default_ttl


def new_record(plan: Plan, body: bytes, now: float, req: Request, gen: str) -> list[Any]:
    """The stored form of a complete response; derives a strong ETag when the app set none."""
    headers = plan.headers
    etag = plan.etag
    if etag is None and plan.status in (200, 203) and not any(h[0] == b"etag" for h in headers):
        ctype = next((h[1] for h in headers if h[0] == b"content-type"), b"")
        cenc = next((h[1] for h in headers if h[0] == b"content-encoding"), b"")
        etag = body_etag(body, ctype, cenc)
        headers = [*headers, [b"etag", etag]]
    if not any(h[0] == b"content-length" for h in headers) and plan.status not in (204, 304):
        headers = [*headers, [b"content-length", str(len(body)).encode("ascii")]]
    values = req.vary_digest(plan.vary) if plan.vary else ""
    return [
        REC,
        plan.status,
        headers,
        body,
        now,
        plan.lifetime,
        plan.age0,
        etag,
        plan.last_modified,
        list(plan.vary),
        values,
        gen,
        plan.auth_ok,
        plan.swr,
        plan.sie,
    ]


def not_modified(record: list[Any], req: Request) -> bool:
    """RFC 9110 §13.2.2: If-None-Match (weak comparison) wins over If-Modified-Since."""
    if not 200 <= record[STATUS] < 300:
        return False
    if req.inm is not None:
        etag = record[ETAG]
        return etag is not None and (req.inm == [b"*"] or etag in req.inm)
    if req.ims is not None:
        modified = record[LAST_MODIFIED]
        return bool((record[STORED_AT] if modified is None else modified) <= req.ims)
    return False


def answer(
    record: list[Any], req: Request, now: float, status_field: bytes | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two ASGI messages that replay a stored response: a 304 when the client's
    validator matches, no body for HEAD, and Age (RFC 9111 §5.1) on every reuse."""
    age = int(record[AGE0] + max(0.0, now - record[STORED_AT]))
    headers: list[Any]
    if not_modified(record, req):
        status = 304
        headers = [h for h in record[HEADERS] if h[0] in _NOT_MODIFIED_FIELDS]
        body = b""
    else:
        status = record[STATUS]
        headers = list(record[HEADERS])
        body = b"" if req.head else record[BODY]
    headers.append((b"age", str(age).encode("ascii")))
    if status_field is not None:
        headers.append((b"cache-status", status_field))
    start = {"type": "http.response.start", "status": status, "headers": headers}
    return start, {"type": "http.response.body", "body": body}


def remaining(record: list[Any], now: float) -> float:
    """Seconds of freshness left (negative once stale)."""
    return float(record[LIFETIME] - record[AGE0] - (now - record[STORED_AT]))
