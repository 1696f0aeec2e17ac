"""Keys: the same call gives the same key everywhere; different calls never share one."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from redis.crc import key_slot

from cachelayer import Cache, ConfigurationError, InvalidKeyError
from cachelayer._keys import MAX_PLAIN_KEY, RedisKeys, encode_arg, key_builder, storage_key


class Color(enum.Enum):
    RED = "red"


STABLE_ARGS: list[Any] = [
    42,
    'søren\'s "quoted" \\ key',
    1.25,
    None,
    True,
    b"\x00\x01",
    (1, "a", (2,)),
    [3, 4],
    {"b": 2, "a": [1, {"z": None}]},
    frozenset({3, 1, 2}),
    {"x", "y"},
    dt.datetime(2026, 11, 25, 9, 0, tzinfo=dt.timezone.utc),
    dt.date(2026, 11, 25),
    dt.timedelta(seconds=90),
    decimal.Decimal("9.99"),
    uuid.UUID(int=7),
    Color.RED,
]


def test_argument_text_is_the_same_in_a_fresh_interpreter_with_another_hash_seed() -> None:
    here = [encode_arg(a) for a in STABLE_ARGS]
    script = (
        "import json, sys; sys.path.insert(0, 'tests'); import test_keys as t;"
        "from cachelayer._keys import encode_arg;"
        "print(json.dumps([encode_arg(a) for a in t.STABLE_ARGS]))"
    )
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == here


def test_sets_and_dicts_do_not_depend_on_insertion_order() -> None:
    assert encode_arg({"a": 1, "b": 2}) == encode_arg({"b": 2, "a": 1})
    assert encode_arg({3, 1, 2}) == encode_arg({2, 3, 1})


@pytest.mark.parametrize(
    "pair",
    [
        (1, 1.0),
        (1, True),
        (1, "1"),
        ("None", None),
        ((1,), [1]),
        ((1, 2), "(1,2)"),
        ({1}, frozenset({1})),
        (b"ab", "ab"),
        ("a,b", ("a", "b")),
        ('"', "\\"),
    ],
)
def test_values_that_compare_or_print_alike_get_distinct_text(pair: tuple[Any, Any]) -> None:
    a, b = pair
    assert encode_arg(a) != encode_arg(b)


class Opaque:
    pass


def test_objects_whose_repr_has_an_address_are_refused_with_advice() -> None:
    with pytest.raises(InvalidKeyError, match="key="):
        encode_arg(Opaque())
    with pytest.raises(InvalidKeyError):
        encode_arg({"nested": [Opaque()]})


def product(product_id: int, currency: str = "EUR", *, lang: str = "en") -> None: ...


def test_positional_keyword_and_default_spellings_share_one_key() -> None:
    make = key_builder(product, None).make
    spellings = [
        ((1,), {}),
        ((1, "EUR"), {}),
        ((), {"product_id": 1}),
        ((1,), {"currency": "EUR", "lang": "en"}),
        ((), {"lang": "en", "currency": "EUR", "product_id": 1}),
    ]
    keys = {make(args, kwargs) for args, kwargs in spellings}
    assert keys == {'test_keys.product(1,"EUR","en")'}
    assert make((2,), {}) != make((1,), {})


def test_variadic_functions_key_on_all_their_arguments() -> None:
    def search(*terms: str, **filters: int) -> None: ...

    make = key_builder(search, None).make
    assert make(("a", "b"), {"x": 1, "y": 2}) == make(("a", "b"), {"y": 2, "x": 1})
    assert make(("a", "b"), {}) != make(("b", "a"), {})


def test_a_leading_self_is_left_out_of_the_default_key() -> None:
    class Repo:
        def get(self, item_id: int) -> None: ...

    make = key_builder(Repo.get, None).make
    assert make((Repo(), 5), {}) == make((Repo(), 5), {})


def test_templates_are_filled_from_bound_arguments() -> None:
    plan = key_builder(product, "product:{product_id}:{currency}")
    assert plan.make((7,), {}) == "product:7:EUR"
    assert plan.make((), {"product_id": 7, "currency": "USD"}) == "product:7:USD"


def test_template_formats_and_attributes_work() -> None:
    def user(u: Any, page: int) -> None: ...

    class U:
        id = 9

    plan = key_builder(user, "user:{u.id}:page:{page:03d}")
    assert plan.make((U(), 2), {}) == "user:9:page:002"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("product:{id}", "not a parameter"),
        ("product:{0}", "must name parameters"),
        ("product:{}", "must name parameters"),
        ("product:{product_id", "malformed"),
        ("product:{product_id:{currency}}", "nested"),
    ],
)
def test_broken_templates_fail_at_decoration_time(template: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        key_builder(product, template)


def test_callable_keys_must_return_strings() -> None:
    assert key_builder(product, lambda product_id, **_: f"p{product_id}").make((3,), {}) == "p3"
    with pytest.raises(InvalidKeyError, match="not str"):
        key_builder(product, lambda *a, **k: 3).make((3,), {})


def test_short_safe_keys_are_kept_readable() -> None:
    assert storage_key("product:42") == "product:42"


@pytest.mark.parametrize(
    "key", ["x" * (MAX_PLAIN_KEY + 1), "brace{y}", "brace}", "ünïcode", "tab\tkey", "new\nline"]
)
def test_long_or_unsafe_keys_are_hashed_to_a_bounded_brace_free_form(key: str) -> None:
    stored = storage_key(key)
    assert stored != key
    assert len(stored) <= 100
    assert "{" not in stored and "}" not in stored
    assert stored == storage_key(key)
    assert storage_key(key + "!") != stored


def test_redis_keys_live_under_namespace_and_format_version_in_one_hash_slot() -> None:
    keys = RedisKeys("shop")
    value = keys.value("product:42")
    assert value.startswith("shop:v1:")
    # Coordination keys (leases, fences) will use the same braces: one Cluster slot.
    assert key_slot(value.encode()) == key_slot(b"shop:v1:lease:{product:42}")


def test_decorated_calls_of_an_int_agree_with_the_full_key_builder() -> None:
    cache = Cache(None)
    calls: list[Any] = []

    @cache.cached()
    def get(item: Any) -> Any:
        calls.append(item)
        return item

    # 1, True and 1.0 are equal dict keys: the memoised fast path must still tell them apart.
    for arg in (1, True, 1.0, "1", 1, True, 1.0, "1"):
        assert type(get(arg)) is type(arg)
    assert calls == [1, True, 1.0, "1"]
    assert get.key(1) == key_builder(get.__wrapped__, None).make((1,), {})


@pytest.mark.parametrize("bad", ["", "a b", "a{b", "x" * 65, 3, None])
def test_bad_namespaces_are_refused(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="namespace"):
        Cache(None, namespace=bad)
