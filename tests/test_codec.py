"""The wire format: exact round trips, clear refusals, and garbage read as garbage."""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import uuid
import zoneinfo
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachelayer import SerializationError
from cachelayer._codec import (
    CorruptEntryError,
    Entry,
    decode_value,
    encode_value,
    pack_entry,
    unpack_entry,
)

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")

ROUND_TRIPS: list[Any] = [
    None,
    True,
    0,
    -(2**63),
    2**64 - 1,
    2**200,
    -(2**100),
    1.5,
    "text ✓",
    b"\x00\xffbytes",
    [1, [2, [3]]],
    (1, (2, (3,)), []),
    {"nested": {"tuple": (1, 2), "list": [1, 2]}},
    {1: "int key", (1, 2): "tuple key", frozenset({3}): "frozenset key", None: "none key"},
    {1, 2, 3},
    frozenset({"a", "b"}),
    dt.datetime(2026, 11, 25, 9, 30, 1, 123456),
    dt.datetime(2026, 11, 25, 9, 30, tzinfo=dt.timezone.utc),
    dt.datetime(2026, 11, 25, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5), "EST")),
    dt.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=BERLIN),
    dt.date(2026, 2, 28),
    dt.time(23, 59, 59, 999999),
    dt.time(8, 0, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    dt.timedelta(days=-3, seconds=5, microseconds=7),
    decimal.Decimal("19.990"),
    decimal.Decimal("-Infinity"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    {"when": [dt.date(2026, 1, 1), (decimal.Decimal("1.10"), {uuid.UUID(int=1)})]},
]


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down (== alone calls (1,) and [1] different
    but 1 and True the same, and ignores tzinfo identity)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            any(same(k, k2) and same(v, b[k2]) for k2 in b if k2 == k) for k, v in a.items()
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (dt.datetime, dt.time)):
        return (
            a == b
            and a.tzinfo == b.tzinfo
            and a.fold == b.fold
            and (
                a.tzinfo is None or a.tzname() == b.tzname()  # type: ignore[union-attr]
            )
        )
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)  # 19.990 must not come back as 19.99
    return bool(a == b)


@pytest.mark.parametrize("value", ROUND_TRIPS, ids=lambda v: type(v).__name__)
def test_values_users_cache_daily_round_trip_exactly(value: Any) -> None:
    out = decode_value(encode_value(value))
    assert same(out, value), (value, out)


def test_zoneinfo_datetimes_keep_their_zone_not_just_their_offset() -> None:
    summer = dt.datetime(2026, 7, 1, 12, tzinfo=BERLIN)
    out = decode_value(encode_value(summer))
    assert out.tzinfo is BERLIN  # ZoneInfo instances are cached per key
    assert (out + dt.timedelta(days=180)).utcoffset() == dt.timedelta(hours=1)


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


class OddZone(dt.tzinfo):
    def utcoffset(self, _: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=1)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (Point(1), "Point"),
        ({"nested": [Point(2)]}, "Point"),
        (collections.OrderedDict(a=1), "OrderedDict"),
        (dt.datetime(2026, 1, 1, tzinfo=OddZone()), "OddZone"),
    ],
)
def test_unencodable_values_name_their_type_and_key(value: Any, type_name: str) -> None:
    with pytest.raises(SerializationError) as info:
        encode_value(value, key="product:7")
    assert type_name in str(info.value)
    assert "product:7" in str(info.value)
    assert info.value.key == "product:7"
    assert isinstance(info.value, ValueError)


def test_binary_buffers_come_back_as_bytes_as_documented() -> None:
    # msgpack packs any buffer as bin before a default hook could see it.
    assert decode_value(encode_value(bytearray(b"ab"))) == b"ab"
    assert type(decode_value(encode_value(memoryview(b"ab")))) is bytes


def test_strings_that_are_not_unicode_are_refused_not_mangled() -> None:
    with pytest.raises(SerializationError):
        encode_value("\ud800", key="k")


def _entry(value: Any = "v", tags: tuple[str, ...] = ("catalog",)) -> Entry:
    return Entry(value, encode_value(value), 100.0, 160.0, 190.0, 0.25, tags, (3,) * len(tags))


def test_envelope_carries_what_later_features_need() -> None:
    back = unpack_entry(pack_entry(_entry({"id": 1})))
    assert back.value == {"id": 1}
    assert (back.stored_at, back.fresh_until, back.stale_until) == (100.0, 160.0, 190.0)
    assert back.load_time == 0.25
    assert back.tags == ("catalog",)
    assert back.tag_versions == (3,)


GARBAGE = [
    b"",
    b"hello",
    b"\xc1",  # never used in msgpack
    b"\x92\x01",  # truncated array
    msgpack.packb([1, 2, 3]),
    msgpack.packb([2, 1.0, 2.0, 3.0, 0.0, [], b"", []]),  # a future format version
    msgpack.packb([1, "a", 2.0, 3.0, 0.0, [], b"\xc0", []]),  # times not numbers
    msgpack.packb([1, 1.0, 2.0, 3.0, 0.0, [7], b"\xc0", [1]]),  # tags not strings
    msgpack.packb([1, 1.0, 2.0, 3.0, 0.0, [], "not bytes", []]),
    msgpack.packb([1, 1.0, 2.0, 3.0, 0.0, [], b"\xd4\x63\x00", []]),  # unknown ext type 99
    msgpack.packb([1, 1.0, 2.0, 3.0, 0.0, [], b"\xa2\xff\xfe", []]),  # invalid utf-8 str
    msgpack.packb([1, 1.0, 2.0, 3.0, 0.0, ["a"], b"\xc0", []]),  # versions missing
    msgpack.packb([1, 1.0, 2.0, 3.0, 0.0, ["a"], b"\xc0", ["1"]]),  # versions not ints
    msgpack.packb([1, 1.0, 2.0, 3.0, 0.0, [], b"\xc0"]),  # the 7-field draft of v1
    msgpack.packb({"value": 1}),
    pack_entry(_entry())[:-3],
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_and_foreign_bytes_are_corrupt_entries(data: bytes) -> None:
    with pytest.raises(CorruptEntryError):
        unpack_entry(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_no_byte_string_escapes_as_anything_but_a_corrupt_entry(data: bytes) -> None:
    try:
        unpack_entry(data)
    except CorruptEntryError:
        pass


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.datetimes()
    | st.dates()
    | st.decimals(allow_nan=False)
    | st.uuids()
)
hashables = st.recursive(
    scalars, lambda c: st.tuples(c, c) | st.frozensets(c, max_size=3), max_leaves=6
)
values = st.recursive(
    scalars,
    lambda c: (
        st.lists(c, max_size=4)
        | st.tuples(c, c)
        | st.dictionaries(hashables, c, max_size=4)
        | st.sets(hashables, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_any_supported_value_round_trips_exactly(value: Any) -> None:
    try:
        payload = encode_value(value)
    except SerializationError:
        # Only strings with lone surrogates may be refused.
        assert "surrogate" in repr(value) or "\\ud" in repr(value)
        return
    assert same(decode_value(payload), value)
