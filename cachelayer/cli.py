"""The ``cachelayer`` command.

    cachelayer surge [--duration S] [--rate R] [--pool-size N] [--keys K] [--ttl S] ...
    cachelayer invalidate --redis URL --namespace NS (--key K | --tag T) ... [--expire]
    cachelayer stats --redis URL --namespace NS

Each subcommand registers its arguments with an ``add_<name>`` function and runs through a
handler that imports what it needs only when called, so ``cachelayer --help`` (and
``import cachelayer``) never pulls in the surge replay's dependencies. A new subcommand
(``invalidate``, ``stats``) is one more ``add_<name>`` listed in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._cli_invalidate import add_invalidate
from ._cli_stats import add_stats

Handler = Callable[[argparse.Namespace], int]


def _number(
    kind: type[float] | type[int], what: str, minimum: float, strict: bool
) -> Callable[[str], float]:
    """An argparse type that names the rule it enforces in its error message."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if value < minimum or (strict and value == minimum) or value != value:
            rule = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"
            raise argparse.ArgumentTypeError(f"{what} must be {rule}, got {text}")
        return value

    return parse


def cache_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for a ``Cache()`` keyword; VALUE is read as JSON when it can be
    (``8``, ``0.5``, ``true``, ``null``) and kept as a string otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def add_surge(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "surge",
        help="replay a traffic surge against a shop, with and without cachelayer",
        description=(
            "Replay a campaign's traffic surge (baseline, ramp to a multiple of it, a database "
            "brown-out, recovery) against a small shop app over a real database with a "
            "bounded connection pool, once without a cache and once with cachelayer, and "
            "print both runs side by side. Defaults need nothing installed: SQLite, L1 only."
        ),
    )
    seconds = _number(float, "a duration", 0, strict=True)
    p.add_argument(
        "--duration",
        type=seconds,
        default=12.0,
        metavar="S",
        help="seconds per run (two runs; default 12)",
    )
    p.add_argument(
        "--rate",
        type=_number(float, "the rate", 0, True),
        default=60.0,
        metavar="R",
        help="baseline requests per second (default 60)",
    )
    p.add_argument(
        "--surge",
        type=_number(float, "the surge", 1, False),
        default=10.0,
        metavar="X",
        help="peak rate as a multiple of the baseline (default 10)",
    )
    p.add_argument(
        "--pool-size",
        type=_number(int, "the pool size", 1, False),
        default=10,
        metavar="N",
        help="database connections in the pool (default 10)",
    )
    p.add_argument(
        "--keys",
        type=_number(int, "the number of keys", 1, False),
        default=1000,
        metavar="K",
        help="catalog products (default 1000)",
    )
    p.add_argument(
        "--ttl", type=seconds, default=5.0, metavar="S", help="cache TTL in seconds (default 5)"
    )
    p.add_argument(
        "--stale-ttl",
        type=_number(float, "the stale TTL", 0, False),
        default=0.0,
        metavar="S",
        help="grace period handed to Cache(stale_ttl=...) (default 0)",
    )
    p.add_argument(
        "--cache-option",
        action="append",
        default=[],
        type=cache_option,
        metavar="KEY=VALUE",
        help="another Cache() keyword for the cached run, e.g. origin_limit=8 (repeatable)",
    )
    p.add_argument(
        "--db-delay-ms",
        type=_number(float, "the delay", 0, False),
        default=0.0,
        metavar="MS",
        help="injected latency per query, reported as such (default 0)",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        metavar="URL",
        help="postgresql://... or sqlite:///file (default "
        "$DATABASE_URL, else a throwaway SQLite file)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL") or None,
        metavar="URL",
        help="use L1 + Redis in the cached run (default $REDIS_URL, else L1 only)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="serve the app with uvicorn on 127.0.0.1 and generate load from another process",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the schedule and the data")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(handler=_run_surge)


def _run_surge(args: argparse.Namespace) -> int:
    try:
        from .surge.command import surge
    except ImportError as exc:
        print(
            f"cachelayer surge: error: missing dependency ({exc.name}); "
            "install it with: pip install 'cachelayer[surge]'",
            file=sys.stderr,
        )
        return 1
    return surge(args)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    add_surge,
    add_invalidate,
    add_stats,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachelayer", description="cachelayer: a read-through cache for surges."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
