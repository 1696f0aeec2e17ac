"""``cachelayer surge``: arguments in, table (or JSON) out, and a live line on a terminal."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from .app import quiet_cache_warnings
from .loadgen import Progress
from .replay import run
from .report import table, to_json
from .scenario import Scenario, SurgeError


class LiveLine:
    """Rewrites one terminal line per progress report; each run ends its line.

    Used only when stderr is a terminal: piped or logged output stays free of carriage
    returns.
    """

    def __init__(self, stream: TextIO, total: float) -> None:
        self._stream = stream
        self._total = total

    def __call__(self, run_name: str) -> Progress:
        width = 30
        finished = False

        def show(elapsed: float, phase: str, done: int, failed: int, final: bool) -> None:
            nonlocal finished
            if finished:
                return
            finished = final
            filled = int(width * elapsed / self._total) if self._total else width
            bar = "#" * filled + "." * (width - filled)
            line = (
                f"\r{run_name:>10} [{bar}] {elapsed:5.1f}/{self._total:g}s {phase:<9} "
                f"{done:>7,} done {failed:>6,} failed"
            )
            end = "\n" if finished else ""
            self._stream.write(line + end)
            self._stream.flush()

        return show


def surge(args: argparse.Namespace) -> int:
    quiet_cache_warnings()
    try:
        sc = Scenario(
            duration=args.duration,
            rate=args.rate,
            surge=args.surge,
            pool_size=args.pool_size,
            keys=args.keys,
            ttl=args.ttl,
            stale_ttl=args.stale_ttl,
            cache_options=dict(args.cache_option),
            db_delay=args.db_delay_ms / 1000,
            seed=args.seed,
        )
        live = LiveLine(sys.stderr, sc.duration) if sys.stderr.isatty() else None
        result = run(
            sc,
            database_url=args.database_url,
            redis_url=args.redis_url,
            serve=args.serve,
            progress=live,
        )
    except SurgeError as exc:
        print(f"cachelayer surge: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except KeyboardInterrupt:
        print("\ncachelayer surge: interrupted; the replay's tables were dropped", file=sys.stderr)
        return 130
    print(to_json(result) if args.json else table(result))
    return 0
