"""HTTP field parsing for the ASGI cache: Cache-Control, dates, entity tags, Vary, tags.

Every parser here reads bytes that a stranger controls, so each returns None (or an empty
result) for anything it does not fully understand instead of raising, and callers treat None
as "do not cache". Nothing here imports Starlette: the fields are ASGI's raw byte pairs.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import re

# RFC 9110 §5.6.2 token characters; a directive or field name outside them is garbage.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# One Cache-Control member: name, then optionally "=" and a token or a quoted string.
_DIRECTIVE = re.compile(
    r'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*(?:=\s*(?:([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)|"((?:[^"\\]|\\.)*)"))?\s*(,|$)'
)
_QUOTED_PAIR = re.compile(r"\\(.)")
_ETAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')

MAX_FIELD = 8192  # longer values of the fields we parse are treated as garbage
MAX_DELTA = 2147483648  # RFC 9111 §1.2.2: larger delta-seconds are capped here
MAX_TAGS = 64
MAX_TAG_LEN = 200

Directives = dict[str, "str | None"]


def field_text(value: bytes) -> str | None:
    """The field value as text, or None when it is too long or not visible ASCII.

    Header bytes outside ASCII are legal on the wire but meaningless in every field we parse;
    refusing them keeps "what we parsed" and "what the app will parse" the same thing.
    """
    if len(value) > MAX_FIELD or not value.isascii():
        return None
    text = value.decode("ascii").replace("\t", " ")
    return text if text.isprintable() else None


def parse_cache_control(value: bytes) -> Directives | None:
    """Directives (lowercased names; None for a bare directive), or None for garbage.

    A directive that appears twice with different values is garbage too (RFC 9111 §4.2.1
    lets a cache treat such a response as stale, which for us means "do not store").
    """
    text = field_text(value)
    if text is None:
        return None
    out: Directives = {}
    pos, end = 0, len(text)
    while pos < end:
        if text[pos] in " \t,":
            pos += 1
            continue
        m = _DIRECTIVE.match(text, pos)
        if m is None:
            return None
        name = m.group(1).lower()
        arg = m.group(2)
        if arg is None and m.group(3) is not None:
            arg = _QUOTED_PAIR.sub(r"\1", m.group(3))
        if name in out and out[name] != arg:
            return None
        out[name] = arg
        pos = m.end()
    return out


def delta_seconds(value: str | None) -> int | None:
    """RFC 9111 §1.2.2 delta-seconds; None when missing or not a non-negative integer."""
    if value is None or not value.isdigit() or not value.isascii():
        return None
    return min(int(value), MAX_DELTA)


def field_names(value: str | None) -> tuple[str, ...] | None:
    """The field names of a qualified ``private="a, b"`` / ``no-cache="..."``; None if bad."""
    if value is None:
        return ()
    names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
    return names if all(_TOKEN.fullmatch(n) for n in names) else None


def parse_http_date(value: bytes) -> float | None:
    """An HTTP-date (any of the three RFC 9110 §5.6.7 forms) as POSIX seconds, else None."""
    text = field_text(value)
    if text is None or not 20 <= len(text) <= 40:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:  # "-0000": RFC 9110 dates are always GMT
        return parsed.replace(tzinfo=dt.timezone.utc).timestamp()
    return parsed.timestamp()


def format_http_date(seconds: float) -> bytes:
    return email.utils.formatdate(seconds, usegmt=True).encode("ascii")


def parse_etags(value: bytes) -> list[bytes] | None:
    """The opaque tags of an If-None-Match list (weakness dropped), ``[b"*"]``, or None."""
    text = field_text(value)
    if text is None:
        return None
    if text.strip() == "*":
        return [b"*"]
    tags: list[bytes] = []
    pos, end = 0, len(text)
    while pos < end:
        if text[pos] in " \t,":
            pos += 1
            continue
        m = _ETAG.match(text, pos)
        if m is None:
            return None
        tags.append(m.group(2).encode("ascii"))
        pos = m.end()
    return tags


def opaque_etag(value: bytes) -> bytes | None:
    """A response ETag's opaque part (for weak comparison), or None if it is not one tag."""
    tags = parse_etags(value)
    return tags[0] if tags is not None and len(tags) == 1 and tags[0] != b"*" else None


def body_etag(body: bytes, content_type: bytes, content_encoding: bytes) -> bytes:
    """A strong validator for a response the app gave none: the same in every process and
    after restarts, because it is a digest of what the client receives, headers included."""
    h = hashlib.blake2b(digest_size=16)
    for part in (content_type, content_encoding):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    h.update(body)
    return b'"cl-' + h.hexdigest().encode("ascii") + b'"'


def parse_vary(value: bytes) -> tuple[str, ...] | None:
    """Lowercased field names of a Vary value; ``("*",)`` for "*"; None for garbage."""
    text = field_text(value)
    if text is None:
        return None
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    if "*" in names:
        return ("*",)
    return names if all(_TOKEN.fullmatch(n) for n in names) else None


# Fields whose values are case-insensitive tokens; normalising them keeps variants few.
_CASELESS = frozenset({"accept", "accept-encoding", "accept-language", "accept-charset"})


def normalise_vary_value(name: str, lines: list[bytes]) -> str | None:
    """One request field, as a Vary key component: None when absent ("" is present-empty).

    Field lines are combined with commas and list members are trimmed, so formatting that
    means the same thing (RFC 9111 §4.1) selects the same variant. Bytes outside ASCII are
    kept (escaped) rather than rejected, since an odd value must still select its own variant.
    """
    if not lines:
        return None
    raw = b",".join(lines).decode("latin-1")
    members = [" ".join(m.split()) for m in raw.split(",")]
    text = ",".join(m for m in members if m)
    if name in _CASELESS:
        text = text.lower()
    return text.encode("unicode_escape").decode("ascii") if not text.isascii() else text


def parse_tags(value: bytes) -> tuple[str, ...] | None:
    """Tags from a Cache-Tag style field (comma or space separated); None when unusable."""
    text = field_text(value)
    if text is None:
        return None
    tags = tuple(dict.fromkeys(t for t in re.split(r"[,\s]+", text) if t))
    if len(tags) > MAX_TAGS or any(len(t) > MAX_TAG_LEN for t in tags):
        return None
    return tags
