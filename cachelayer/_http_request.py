"""The request side of the ASGI cache: settings, route rules, and which requests may use it.

``classify`` turns an ASGI scope into either a ``Request`` (the cache key and what the client
asked for) or a short reason string, which means "pass this request around the cache". It
only ever reads the scope, and whenever a request is ambiguous (a path two components could
read differently, a header that may change the response but is not in the key) it bypasses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

from ._http_headers import (
    normalise_vary_value,
    parse_cache_control,
    parse_etags,
    parse_http_date,
)
from ._http_settings import NO_RULE, Rule, Settings

log = logging.getLogger("cachelayer.asgi")

Scope = Mapping[str, Any]
Headers = list[tuple[bytes, bytes]]

# Headers with which a client or proxy can change what the app renders (links, scheme, the
# route itself) without changing the key. Present and untrusted means "bypass".
FORWARDED = frozenset(
    {
        b"forwarded",
        b"x-forwarded-host",
        b"x-forwarded-server",
        b"x-forwarded-proto",
        b"x-forwarded-scheme",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-ssl",
        b"x-original-url",
        b"x-original-host",
        b"x-rewrite-url",
        b"x-host",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
    }
)
# Requests the cache cannot answer from a full stored response; the app answers them.
_PASS_HEADERS = frozenset(
    {b"range", b"if-range", b"if-match", b"if-unmodified-since", b"content-length"}
    | {b"transfer-encoding", b"upgrade"}
)
_CONDITIONAL = frozenset({b"if-none-match", b"if-modified-since"})
_SAFE_PATH = re.compile(r"[A-Za-z0-9/!$&'()*+,;=:@\-._~]*")
_HOST = re.compile(r"[a-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9a-f:.]{2,45}\](:[0-9]{1,5})?")
_DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")
_MAX_PATH = 2048
_MAX_QUERY = 4096
_MEMO_SIZE = 4096
Located = tuple[str, bytes, Rule]


class Request:
    """A GET or HEAD the cache may answer: its key, and what the client asked for."""

    __slots__ = (
        "auth",
        "head",
        "headers",
        "ims",
        "inm",
        "key",
        "lookup_only",
        "only_if_cached",
        "query",
        "refresh",
        "rule",
        "scope",
        "shared",
    )

    def __init__(self, key: str, scope: Scope, query: bytes, headers: Headers, rule: Rule):
        self.key = key
        self.scope = scope
        self.query = query
        self.headers = headers
        self.rule = rule
        self.head = False
        self.auth = False
        self.inm: list[bytes] | None = None
        self.ims: float | None = None
        self.lookup_only = False  # client said no-store: may be answered, never stored
        self.refresh = False  # client no-cache, honoured only when configured
        self.only_if_cached = False
        self.shared = True  # False: partitioned by private_key, a private cache per principal

    def app_scope(self) -> dict[str, Any]:
        """What the app sees when the cache asks it: the canonical query the key was built
        from (so a parameter outside the key cannot shape a stored page), and no validators
        (so it renders the full response the cache stores; the client's conditional is
        answered from that)."""
        scope = dict(self.scope)
        scope["query_string"] = self.query
        scope["headers"] = [(n, v) for n, v in self.headers if n not in _CONDITIONAL]
        return scope

    def field(self, name: str) -> list[bytes]:
        """Every line of one request field, in order (for Vary)."""
        raw = name.encode("latin-1")
        return [v for n, v in self.headers if n == raw]

    def vary_digest(self, names: Iterable[str]) -> str:
        """This request's normalised values of ``names``, as a digest: what selects a variant,
        small enough to store whatever a client sends."""
        values = [normalise_vary_value(n, self.field(n)) for n in names]
        return hashlib.blake2b(json.dumps(values).encode(), digest_size=16).hexdigest()


def match_rule(settings: Settings, path: str) -> Rule:
    for rule in settings.rules:
        if rule.regex.match(path):
            return rule
    return NO_RULE


def canonical_query(raw: bytes, rule: Rule) -> bytes | None:
    """Parameters sorted by name (stably, so repeated names keep their order), filtered by
    the rule; None for a query the cache will not reason about."""
    if not raw:
        return b""
    if len(raw) > _MAX_QUERY or not raw.isascii():
        return None
    parts = [p for p in raw.split(b"&") if p]
    named = [(unquote_plus(p.split(b"=", 1)[0].decode("ascii")), p) for p in parts]
    if rule.query_include is not None:
        named = [np for np in named if np[0] in rule.query_include]
    if rule.query_exclude:
        named = [np for np in named if np[0] not in rule.query_exclude]
    named.sort(key=lambda np: np[0])
    return b"&".join(p for _, p in named)


def url_part(scope: Scope, host: str) -> str | None:
    """The partition-free part of a URL's key, or None when its path is ambiguous.

    The path is the one the router sees (``scope["path"]``, already percent-decoded), quoted
    back so that no path can collide with a path-plus-query. Dot segments and encoded
    slashes are refused rather than normalised: the router does not normalise them either,
    and a key that resolves them differently from the app is how cache deception works.
    """
    path = scope["path"]
    root = scope.get("root_path", "")
    if len(path) > _MAX_PATH or "\\" in path or not path.startswith("/"):
        return None
    if _DOT_SEGMENT.search(path) or not path.isprintable():
        return None
    raw_path = scope.get("raw_path")
    if raw_path and (b"%2f" in raw_path.lower() or b"%5c" in raw_path.lower()):
        return None
    if not _SAFE_PATH.fullmatch(path):
        path = quote(path, safe="/!$&'()*+,;=:@-._~")
    if root and not _SAFE_PATH.fullmatch(root):
        root = quote(root, safe="/")
    return f"{scope.get('scheme', 'http')}://{host}{root}|{path}"


def partition_of(settings: Settings, scope: Scope) -> str | None:
    """``s`` for the shared cache, ``u<digest>`` for a principal, None for "do not cache"."""
    if settings.private_key is None:
        return "s"
    try:
        principal = settings.private_key(scope)
    except Exception:
        log.warning("cachelayer: private_key raised; not caching this request", exc_info=True)
        return None
    if principal is None:
        return None
    if not isinstance(principal, str):
        log.warning("cachelayer: private_key returned %r, not a str; not caching", principal)
        return None
    digest = hashlib.blake2b(principal.encode("utf-8", "surrogatepass"), digest_size=16)
    return "u" + digest.hexdigest()


def host_of(settings: Settings, value: bytes | None) -> str | None:
    host = (value or b"").decode("latin-1").lower()
    if host and not _HOST.fullmatch(host):
        return None
    if settings.hosts is not None:
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if host not in settings.hosts and name not in settings.hosts:
            return None
    return host


def locate(settings: Settings, scope: Scope, host: bytes | None) -> Located | str:
    """The URL's key (without partition), canonical query and rule, or why not to cache.

    Pure in the URL, so memoised: a hot URL pays for its parsing once, not on every hit.
    """
    memo_key = (
        host,
        scope.get("scheme"),
        scope.get("root_path", ""),
        scope["path"],
        scope.get("raw_path"),
        scope.get("query_string", b""),
    )
    found: Located | str | None = settings.memo.get(memo_key)
    if found is not None:
        return found
    rule = match_rule(settings, scope["path"])
    hoststr = host_of(settings, host)
    url = None if hoststr is None else url_part(scope, hoststr)
    query = canonical_query(scope.get("query_string", b""), rule)
    result: Located | str
    if not rule.cache:
        result = "rule"
    elif url is None or query is None:
        result = "uri"
    else:
        result = (f"{url}?{query.decode('ascii')}", query, rule)
    if len(settings.memo) >= _MEMO_SIZE:
        settings.memo.clear()
    settings.memo[memo_key] = result
    return result


def full_key(
    settings: Settings, url: str, partition: str, trusted: list[bytes], variant: str = "p"
) -> str:
    """``prefix:partition:forwarded:variant:url``. Every field but the URL is fixed-format and
    free of ``:``, and the URL (which a client shapes) comes last, so no request can spell
    another's key: not another partition's, another forwarded value's, nor a variant's."""
    fwd = ""
    if trusted:
        fwd = hashlib.blake2b(b"|".join(sorted(trusted)), digest_size=16).hexdigest()
    return f"{settings.prefix}:{partition}:{fwd}:{variant}:{url}"


def variant_key(primary_key: str, variant: str) -> str:
    """The key of one variant: the primary's with its ``p`` field replaced."""
    head, url = primary_key.split(":p:", 1)
    return f"{head}:{variant}:{url}"


def invalidation_keys(settings: Settings, scope: Scope, locations: list[bytes]) -> list[str]:
    """Keys an unsafe request invalidates (RFC 9111 §4.4): its own URL and same-origin
    Location / Content-Location targets, in the requester's partition."""
    host: bytes | None = None
    trusted: list[bytes] = []
    for name, value in scope["headers"]:
        name = name.lower()
        if name == b"host":
            host = value
        elif name in FORWARDED and name in settings.trusted:
            trusted.append(name + b"=" + value)
    partition = partition_of(settings, scope)
    if partition is None:
        return []
    scopes = [scope]
    authority = (host or b"").lower()
    for loc in locations:
        if loc.startswith((b"http://", b"https://")):
            rest = loc.split(b"://", 1)[1]
            if rest.split(b"/", 1)[0].lower() != authority:
                continue  # another origin's entries are not ours to drop
            loc = b"/" + rest.split(b"/", 1)[1] if b"/" in rest else b"/"
        if not loc.startswith(b"/") or loc.startswith(b"//") or not loc.isascii():
            continue
        path, _, query = loc.partition(b"#")[0].partition(b"?")
        url = {"path": unquote(path.decode("ascii")), "query_string": query}
        scopes.append({**scope, **url, "raw_path": path})
    keys = []
    for s in scopes:
        located = locate(settings, s, host)
        if not isinstance(located, str):
            keys.append(full_key(settings, located[0], partition, trusted))
    return keys


def classify(settings: Settings, scope: Scope) -> Request | str:
    """A ``Request`` for GET/HEAD the cache may answer, else the reason it may not."""
    host: bytes | None = None
    cookie = auth = False
    cc: list[bytes] = []
    pragma = False
    inm: list[bytes] = []
    ims: list[bytes] = []
    trusted: list[bytes] = []
    headers: Headers = []
    for name, value in scope["headers"]:
        name = name.lower()  # servers lowercase names, but a leak must not hinge on it
        headers.append((name, value))
        if name == b"host":
            if host is not None:
                return "host"
            host = value
        elif name == b"cookie":
            cookie = True
        elif name == b"authorization":
            auth = True
        elif name in _CONDITIONAL:
            (inm if name == b"if-none-match" else ims).append(value)
        elif name == b"cache-control":
            cc.append(value)
        elif name == b"pragma":
            pragma = True
        elif name in _PASS_HEADERS:
            if name != b"content-length" or value.strip() not in (b"", b"0"):
                return "request-body" if name != b"range" else "range"
        elif name in FORWARDED:
            if name not in settings.trusted:
                return "forwarded"
            trusted.append(name + b"=" + value)
    located = locate(settings, scope, host)
    if isinstance(located, str):
        return located
    if cookie and settings.private_key is None:
        return "cookie"
    partition = partition_of(settings, scope)
    if partition is None:
        return "private"
    url, query, rule = located
    req = Request(full_key(settings, url, partition, trusted), scope, query, headers, rule)
    req.head = scope["method"] == "HEAD"
    req.shared = partition == "s"
    req.auth = auth and req.shared
    if inm:
        req.inm = parse_etags(b",".join(inm))
    elif len(ims) == 1:
        req.ims = parse_http_date(ims[0])
    if cc:
        directives = parse_cache_control(b",".join(cc)) or {}
        req.lookup_only = "no-store" in directives
        req.only_if_cached = "only-if-cached" in directives
        if settings.allow_client_no_cache:
            req.refresh = "no-cache" in directives or directives.get("max-age") == "0"
    if pragma and not cc and settings.allow_client_no_cache:
        req.refresh = True
    return req
