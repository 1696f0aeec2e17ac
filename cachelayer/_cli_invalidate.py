"""``cachelayer invalidate``: the incident command. Invalidate keys or tags across the fleet.

    cachelayer invalidate --redis URL --namespace NS --key product:42 --key product:43
    cachelayer invalidate --redis URL --namespace NS --tag catalog

It goes through a ``Cache`` like any writer: fenced deletes, one version bump per tag, one
message every subscribed process applies to its L1. It prints what it did, and exits
non-zero (with the reason, not a traceback) if Redis did not take it.
"""

from __future__ import annotations

import argparse
import sys


def add_invalidate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "invalidate",
        help="invalidate keys or tags in every process of a namespace",
        description=(
            "Delete keys (or mark them stale with --expire) and invalidate tags, in Redis and in "
            "the in-process cache of every process subscribed to the namespace."
        ),
    )
    p.add_argument("--redis", required=True, metavar="URL", help="redis:// URL of the cache")
    p.add_argument("--namespace", required=True, metavar="NS", help="the caches' namespace")
    p.add_argument("--key", action="append", default=[], metavar="K", help="a key (repeatable)")
    p.add_argument("--tag", action="append", default=[], metavar="T", help="a tag (repeatable)")
    p.add_argument(
        "--expire", action="store_true", help="mark the keys stale instead of deleting them"
    )
    p.set_defaults(handler=run_invalidate)


def run_invalidate(args: argparse.Namespace) -> int:
    from . import Cache, CacheError

    if not args.key and not args.tag:
        print("cachelayer invalidate: error: give at least one --key or --tag", file=sys.stderr)
        return 2
    try:
        with Cache(args.redis, namespace=args.namespace, strict=True, redis_timeout=2.0) as cache:
            keys, expired = ([], args.key) if args.expire else (args.key, [])
            cache.invalidate(keys=keys, expire=expired, tags=args.tag)
    except (CacheError, ValueError) as exc:
        reason = exc.__cause__ or exc
        print(f"cachelayer invalidate: error: {reason}", file=sys.stderr)
        return 1
    verb = "expired" if args.expire else "deleted"
    for key in args.key:
        print(f"{verb} key {key!r}")
    for tag in args.tag:
        print(f"invalidated tag {tag!r}")
    print(f"published to every process subscribed to namespace {args.namespace!r}")
    return 0
