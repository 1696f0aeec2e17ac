"""Cache keys: stable across processes and Python versions, bounded, Cluster-friendly.

Three layers:

* ``encode_arg`` turns one argument into text that is the same in every process. It never
  falls back to ``repr()`` of arbitrary objects, whose default form embeds a memory address.
* ``key_builder`` compiles, once per decorated function, the function that turns a call's
  arguments into a key: a fast path for the common positional call, ``Signature.bind`` for
  everything else, so ``f(1)``, ``f(x=1)`` and a defaulted ``f()`` agree.
* ``RedisKeys`` lays keys out in Redis as ``<ns>:v<format>:{<key>}``. The braces are a Redis
  Cluster hash tag: a value and its coordination keys (``<ns>:v1:lease:{<key>}``, ...) land in
  one slot, so a single Lua script can touch them all.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import hashlib
import inspect
import string
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .exceptions import ConfigurationError, InvalidKeyError

# Bumped whenever the envelope changes incompatibly; old bytes then live under other keys.
FORMAT_VERSION = 1

MAX_PLAIN_KEY = 200  # longer keys are hashed so Redis keys stay bounded
_PREFIX_KEEP = 48  # how much of a hashed key stays readable
_SAFE = frozenset(string.ascii_letters + string.digits + "-_.:/=+@%!~$&*()[],;'\"<>?|^` ")

KeyFunc = Callable[[tuple[Any, ...], dict[str, Any]], str]


def storage_key(key: str) -> str:
    """Return ``key`` itself when it is short, printable ASCII and brace-free, else a digest.

    ASCII-only, because what counts as printable outside ASCII changes with the Unicode
    database and so with the Python version. Braces are excluded because they would end the
    hash tag early.
    """
    plain = len(key) <= MAX_PLAIN_KEY and key.isascii() and key.isprintable()
    # '#' marks a digest: a plain key holding one could spell another key's digest form.
    if plain and "{" not in key and "}" not in key and "#" not in key:
        return key
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    readable = "".join(c if c in _SAFE else "_" for c in key[:_PREFIX_KEEP])
    return f"{readable}#{digest}"


def validate_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not namespace:
        raise ConfigurationError(f"namespace must be a non-empty string, got {namespace!r}")
    if len(namespace) > 64 or not all(c in _SAFE and c not in " '\"" for c in namespace):
        raise ConfigurationError(
            f"namespace {namespace!r} must be at most 64 printable ASCII characters "
            "without spaces, quotes or braces"
        )
    return namespace


class RedisKeys:
    """Where each kind of record lives in Redis for one namespace."""

    __slots__ = ("prefix",)

    def __init__(self, namespace: str) -> None:
        self.prefix = f"{namespace}:v{FORMAT_VERSION}:"

    def value(self, key: str) -> str:
        return f"{self.prefix}{{{storage_key(key)}}}"

    def coordination(self, key: str) -> tuple[str, str, str, str]:
        """The value and its lease, fence and waiters-flag keys: one hash slot."""
        tag = f"{{{storage_key(key)}}}"
        p = self.prefix
        return f"{p}{tag}", f"{p}lease:{tag}", f"{p}fence:{tag}", f"{p}wait:{tag}"

    def tag(self, tag: str) -> str:
        """A tag's version counter; tags spread over the cluster, one slot each."""
        return f"{self.prefix}tag:{{{storage_key(tag)}}}"

    @property
    def channel(self) -> str:
        """The pub/sub channel of the namespace (fills, invalidations)."""
        return f"{self.prefix}events"

    def pattern(self) -> str:
        """A SCAN pattern for every record of the namespace (operator tools only)."""
        return f"{self.prefix}*"


# --- stable text for arguments ------------------------------------------------------------


def _enc_str(v: str) -> str:
    # Quoting with escaped quote and backslash is injective and, unlike repr(), does not
    # depend on the Unicode database's idea of what is printable.
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _enc_seq(open_: str, close: str, items: Any) -> str:
    return open_ + ",".join(encode_arg(i) for i in items) + close


def _enc_tuple(v: tuple[Any, ...]) -> str:
    return _enc_seq("(", ",)" if len(v) == 1 else ")", v)


def _enc_dict(v: Mapping[Any, Any]) -> str:
    items = sorted(f"{encode_arg(k)}:{encode_arg(val)}" for k, val in v.items())
    return "{" + ",".join(items) + "}"


def _enc_set(v: set[Any] | frozenset[Any]) -> str:
    return f"{type(v).__name__}({','.join(sorted(encode_arg(i) for i in v))})"


def _enc_bytes(v: bytes) -> str:
    return f"b'{v.hex()}'"


_ENCODERS: dict[type, Callable[[Any], str]] = {
    str: _enc_str,
    int: int.__repr__,
    float: float.__repr__,  # shortest round-trip repr, stable since Python 3.1
    bool: bool.__repr__,
    type(None): lambda v: "None",
    bytes: _enc_bytes,
    tuple: _enc_tuple,
    list: lambda v: _enc_seq("[", "]", v),
    dict: _enc_dict,
    set: _enc_set,
    frozenset: _enc_set,
    dt.datetime: lambda v: f"datetime({v.isoformat()})",
    dt.date: lambda v: f"date({v.isoformat()})",
    dt.time: lambda v: f"time({v.isoformat()})",
    dt.timedelta: lambda v: f"timedelta({v.days},{v.seconds},{v.microseconds})",
    decimal.Decimal: lambda v: f"Decimal({v})",
    uuid.UUID: lambda v: f"UUID({v})",
}
# Subclasses (a str subclass, an IntEnum is handled first) fall back to their base's text.
_BASES = (str, int, float, bytes, tuple, list, dict, set, frozenset, dt.datetime, dt.date)


def encode_arg(value: Any) -> str:
    """Stable text for one argument; raises ``InvalidKeyError`` when there is none."""
    enc = _ENCODERS.get(type(value))
    if enc is not None:
        return enc(value)
    if isinstance(value, enum.Enum):
        cls = type(value)
        return f"{cls.__module__}.{cls.__qualname__}.{value.name}"
    for base in _BASES:
        if isinstance(value, base):
            return _ENCODERS[base](value)
    raise InvalidKeyError(
        f"cannot build a stable cache key from a {type(value).__module__}."
        f"{type(value).__qualname__}; pass key= (a template such as 'user:{{user.id}}' or "
        "a callable) to the decorator"
    )


# --- per-function key builders -------------------------------------------------------------


def _positional_template(template: str, names: list[str]) -> tuple[str, set[str]]:
    """Rewrite ``"product:{product_id}"`` as ``"product:{0}"`` over all parameter values;
    also return the parameters the template reads."""
    out: list[str] = []
    roots: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigurationError(f"malformed key template {template!r}: {exc}") from None
    for literal, field, spec, conversion in parsed:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        cut = min((i for i in (field.find("."), field.find("[")) if i >= 0), default=len(field))
        root, rest = field[:cut], field[cut:]
        if root == "" or root.isdigit():
            raise ConfigurationError(
                f"key template {template!r} must name parameters, e.g. '{{product_id}}'"
            )
        if root not in names:
            raise ConfigurationError(
                f"key template {template!r} names {root!r}, which is not a parameter of the "
                f"function (parameters: {', '.join(names) or 'none'})"
            )
        if spec and "{" in spec:
            raise ConfigurationError(f"key template {template!r}: nested fields are not supported")
        out.append("{" + str(names.index(root)) + rest)
        if conversion:
            out.append("!" + conversion)
        if spec:
            out.append(":" + spec)
        out.append("}")
        roots.add(root)
    return "".join(out), roots


class KeyPlan:
    """How a decorated function's calls become keys.

    ``make(args, kwargs)`` always works. ``memo_nargs >= 0`` says more: the key depends only
    on the last argument when a call passes exactly ``memo_nargs`` positional arguments and no
    keywords, so for an ``int`` or ``str`` last argument the decorator may remember the key it
    built. One-argument lookups (``get_product(42)``, ``load_session(sid)``) are the hit path
    that matters most, and building and hashing the key string is half of its cost.
    """

    __slots__ = ("make", "memo_nargs")

    def __init__(self, make: KeyFunc, memo_nargs: int = -1) -> None:
        self.make = make
        self.memo_nargs = memo_nargs


def key_builder(fn: Callable[..., Any], key: str | Callable[..., str] | None) -> KeyPlan:
    """Compile how calls of ``fn`` map ``(args, kwargs)`` to a cache key."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    names = [p.name for p in params]
    simple = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    nparams = len(params)

    def all_values(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        if simple and not kwargs and len(args) == nparams:
            return args
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments[n] for n in names)

    if callable(key):
        user_key = key

        def from_callable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
            result = user_key(*args, **kwargs)
            if not isinstance(result, str):
                raise InvalidKeyError(
                    f"key function {user_key!r} returned {type(result).__name__}, not str"
                )
            return result

        return KeyPlan(from_callable)

    if isinstance(key, str):
        positional, roots = _positional_template(key, names)
        fmt = positional.format

        def from_template(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
            return fmt(*all_values(args, kwargs))

        only_last = simple and roots == {names[-1]}
        return KeyPlan(from_template, nparams if only_last else -1)

    if key is not None:
        raise ConfigurationError(f"key must be None, a template string or a callable, not {key!r}")

    # Like dogpile.cache: a leading self/cls is left out, so one method on two instances of a
    # repository class shares entries (the instance is the connection, not the question).
    skip = 1 if names and names[0] in ("self", "cls") else 0
    name = f"{fn.__module__}.{fn.__qualname__}"
    if "<lambda>" in name:  # every lambda of a module has one qualname: tell them apart
        name += f"@{getattr(getattr(fn, '__code__', None), 'co_firstlineno', 0)}"
    prefix = f"{name}("
    enc = _ENCODERS

    def from_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        values = all_values(args, kwargs)
        if skip:
            values = values[1:]
        if len(values) == 1:
            (v,) = values
            e = enc.get(type(v))
            return prefix + (e(v) if e is not None else encode_arg(v)) + ")"
        return prefix + ",".join(encode_arg(v) for v in values) + ")"

    return KeyPlan(from_arguments, nparams if simple and nparams - skip == 1 else -1)
