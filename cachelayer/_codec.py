"""The wire format: msgpack, never pickle.

An entry travels as one msgpack array, the *envelope*::

    [format_version, stored_at, fresh_until, stale_until, load_time, [tags...], payload,
     [tag versions...]]

Each tag's version is the one read when the load began; the entry stands only while every
tag still has that version (tag invalidation bumps versions, it never scans entries).

``payload`` is the value packed on its own (a msgpack ``bin``), so the in-process tier can keep
those bytes and hand every caller a fresh copy when asked to, and a corrupt value is told apart
from a corrupt header. Times are wall-clock seconds because several processes share entries.

Types msgpack has no word for, but that users cache daily, travel as extension types and come
back equal *and of the same type* (one documented exception: ``bytearray`` and ``memoryview``
come back as ``bytes``, because msgpack packs every buffer before a hook could see it).
Anything else is refused with ``SerializationError`` rather
than coerced (a tuple silently becoming a list is a bug that surfaces far from its cause).
Decoding only ever builds the types listed here, so bytes in Redis cannot run code.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
import zoneinfo
from typing import Any

import msgpack

from ._keys import FORMAT_VERSION
from .exceptions import SerializationError

_DATETIME, _DATE, _TIME, _TIMEDELTA, _DECIMAL, _UUID, _TUPLE, _SET, _FROZENSET, _BIGINT = range(
    1, 11
)


class CorruptEntryError(ValueError):
    """Bytes under a key are not an envelope this version wrote (garbage, foreign, truncated)."""


class Entry:
    """One cached value and its timing. The same record lives in both tiers.

    The in-process copy has bounds of its own, counted from when this process took it:
    ``l1_limit`` (fresh until, capped by ``l1_ttl``), ``l1_expires`` (kept until), and
    ``l1_fresh``, where the hot path stops answering alone: ``l1_limit``, or earlier when the
    entry enters its early-refresh window. ``visited`` feeds the L1 eviction policy.
    """

    __slots__ = (
        "fresh_until",
        "l1_expires",
        "l1_fresh",
        "l1_limit",
        "load_time",
        "payload",
        "stale_until",
        "stored_at",
        "tag_versions",
        "tags",
        "value",
        "visited",
    )

    def __init__(
        self,
        value: Any,
        payload: bytes | None,
        stored_at: float,
        fresh_until: float,
        stale_until: float,
        load_time: float,
        tags: tuple[str, ...],
        tag_versions: tuple[int, ...] = (),
    ) -> None:
        self.value = value
        self.payload = payload
        self.stored_at = stored_at
        self.fresh_until = fresh_until
        self.stale_until = stale_until
        self.load_time = load_time
        self.tags = tags
        self.tag_versions = tag_versions
        self.l1_fresh = self.l1_limit = fresh_until
        self.l1_expires = stale_until
        self.visited = False


# --- values -------------------------------------------------------------------------------


def _tz_state(tz: dt.tzinfo | None) -> Any:
    if tz is None:
        return None
    if type(tz) is dt.timezone:
        # (offset,) or (offset, name): keeps an explicit name such as "EST".
        args = tz.__getinitargs__()  # type: ignore[attr-defined]
        offset: dt.timedelta = args[0]
        return ["fixed", offset // dt.timedelta(microseconds=1), *args[1:]]
    if type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
        return ["zone", tz.key]
    raise SerializationError(
        f"cannot round-trip tzinfo {type(tz).__module__}.{type(tz).__qualname__}; "
        "use datetime.timezone or zoneinfo.ZoneInfo",
        type_name=type(tz).__qualname__,
    )


def _tz_from_state(state: Any) -> dt.tzinfo | None:
    if state is None:
        return None
    if state[0] == "fixed":
        offset = dt.timedelta(microseconds=state[1])
        return dt.timezone(offset, *state[2:]) if len(state) > 2 else dt.timezone(offset)
    if state[0] == "zone":
        return zoneinfo.ZoneInfo(state[1])
    raise ValueError(f"unknown tz state {state!r}")


def _default(obj: Any) -> msgpack.ExtType:
    t = type(obj)
    if t is tuple:
        return msgpack.ExtType(_TUPLE, _pack(list(obj)))
    if t is dt.datetime:
        parts = [obj.year, obj.month, obj.day, obj.hour, obj.minute, obj.second]
        parts += [obj.microsecond, obj.fold, _tz_state(obj.tzinfo)]
        return msgpack.ExtType(_DATETIME, _pack(parts))
    if t is dt.date:
        return msgpack.ExtType(_DATE, _pack(obj.toordinal()))
    if t is dt.time:
        parts = [obj.hour, obj.minute, obj.second, obj.microsecond, obj.fold]
        return msgpack.ExtType(_TIME, _pack([*parts, _tz_state(obj.tzinfo)]))
    if t is dt.timedelta:
        return msgpack.ExtType(_TIMEDELTA, _pack([obj.days, obj.seconds, obj.microseconds]))
    if t is decimal.Decimal:
        return msgpack.ExtType(_DECIMAL, str(obj).encode())
    if t is uuid.UUID:
        return msgpack.ExtType(_UUID, obj.bytes)
    if t is set:
        return msgpack.ExtType(_SET, _pack(list(obj)))
    if t is frozenset:
        return msgpack.ExtType(_FROZENSET, _pack(list(obj)))
    if t is int:  # outside msgpack's 64-bit range
        return msgpack.ExtType(_BIGINT, str(obj).encode())
    raise SerializationError(
        f"cannot cache a value of type {t.__module__}.{t.__qualname__}: msgpack cannot "
        "round-trip it exactly (convert it to dict/list/str/... in the loader)",
        type_name=f"{t.__module__}.{t.__qualname__}",
    )


def _pack(obj: Any) -> bytes:
    # strict_types: a tuple or a dict subclass reaches _default instead of being coerced.
    return msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _TUPLE:
        return tuple(_unpack(data))
    if code == _DATETIME:
        y, mo, d, h, mi, s, us, fold, tz = _unpack(data)
        return dt.datetime(y, mo, d, h, mi, s, us, tzinfo=_tz_from_state(tz), fold=fold)
    if code == _DATE:
        return dt.date.fromordinal(_unpack(data))
    if code == _TIME:
        h, mi, s, us, fold, tz = _unpack(data)
        return dt.time(h, mi, s, us, tzinfo=_tz_from_state(tz), fold=fold)
    if code == _TIMEDELTA:
        days, seconds, micros = _unpack(data)
        return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
    if code == _DECIMAL:
        return decimal.Decimal(data.decode())
    if code == _UUID:
        return uuid.UUID(bytes=data)
    if code == _SET:
        return set(_unpack(data))
    if code == _FROZENSET:
        return frozenset(_unpack(data))
    if code == _BIGINT:
        return int(data.decode())
    raise ValueError(f"unknown msgpack extension type {code}")


def encode_value(value: Any, key: str | None = None) -> bytes:
    """Pack one value; ``SerializationError`` names the offending type and the key."""
    try:
        return _pack(value)
    except SerializationError as exc:
        where = f" (key {key!r})" if key is not None else ""
        raise SerializationError(f"{exc}{where}", key=key, type_name=exc.type_name) from None
    except (TypeError, ValueError, OverflowError) as exc:
        where = f" for key {key!r}" if key is not None else ""
        raise SerializationError(f"cannot encode value{where}: {exc}", key=key) from exc


def decode_value(payload: bytes) -> Any:
    try:
        return _unpack(payload)
    except Exception as exc:  # msgpack raises a zoo of types on garbage; all mean the same
        raise CorruptEntryError(f"undecodable value: {exc!r}") from exc


# --- envelopes ----------------------------------------------------------------------------


def pack_entry(entry: Entry) -> bytes:
    assert entry.payload is not None
    header = [FORMAT_VERSION, entry.stored_at, entry.fresh_until, entry.stale_until]
    body = [entry.load_time, list(entry.tags), entry.payload, list(entry.tag_versions)]
    return msgpack.packb(header + body, use_bin_type=True)  # type: ignore[no-any-return]


def unpack_entry(data: bytes) -> Entry:
    """Decode an envelope and its value; ``CorruptEntryError`` for anything unexpected."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise CorruptEntryError(f"not a msgpack envelope: {exc!r}") from exc
    if type(obj) is not list or len(obj) != 8 or obj[0] != FORMAT_VERSION:
        raise CorruptEntryError("not an envelope of this format version")
    _, stored_at, fresh_until, stale_until, load_time, tags, payload, versions = obj
    for t in (stored_at, fresh_until, stale_until, load_time):
        if type(t) is not float and type(t) is not int:
            raise CorruptEntryError("envelope times are not numbers")
    if type(payload) is not bytes or type(tags) is not list:
        raise CorruptEntryError("envelope payload or tags malformed")
    if not all(type(t) is str for t in tags):
        raise CorruptEntryError("envelope tags are not strings")
    if type(versions) is not list or len(versions) != len(tags):
        raise CorruptEntryError("envelope tag versions malformed")
    if not all(type(v) is int for v in versions):
        raise CorruptEntryError("envelope tag versions are not integers")
    value = decode_value(payload)
    return Entry(
        value, payload, stored_at, fresh_until, stale_until, load_time, tuple(tags), tuple(versions)
    )
