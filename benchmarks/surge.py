"""The surge replay with every knob exposed; writes JSON and a PNG plot of both runs.

    python benchmarks/surge.py                                  # SQLite, L1 only
    python benchmarks/surge.py --database-url postgresql://postgres@127.0.0.1:5432/test \
        --private-redis --plot-copy docs/img/surge.png          # what docs/benchmarks.md shows

The engine is ``cachelayer.surge`` (the same one ``cachelayer surge`` runs). Every figure is
measured in this run; the no-cache run is the baseline the cached run is compared with.
Results go to ``results/surge-<UTC time>/`` (``surge.json``, ``surge.png``, ``surge.txt``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Iterator

from cachelayer.surge.plot import plot
from cachelayer.surge.replay import run
from cachelayer.surge.report import table, to_json
from cachelayer.surge.scenario import Scenario, SurgeError


def knobs(parser: argparse.ArgumentParser) -> None:
    """One flag per Scenario field, named after it, defaulting to it."""
    for field in dataclasses.fields(Scenario):
        default = field.default
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(default), default=default, help=f"(default {default})")


@contextlib.contextmanager
def redis_for(args: argparse.Namespace) -> Iterator[str | None]:
    if not args.private_redis:
        yield args.redis_url
        return
    from cachelayer.testing import RedisServer

    with RedisServer() as server:
        yield server.url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    knobs(parser)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument(
        "--private-redis", action="store_true", help="start a throwaway redis-server for the run"
    )
    parser.add_argument("--serve", action="store_true", help="uvicorn + out-of-process load")
    parser.add_argument("--results", default="results", help="folder for the run's folder")
    parser.add_argument("--plot-copy", help="also copy the PNG here (e.g. docs/img/surge.png)")
    args = parser.parse_args()
    try:
        sc = Scenario(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Scenario)})
        with redis_for(args) as redis_url:
            result = run(sc, database_url=args.database_url, redis_url=redis_url, serve=args.serve)
    except SurgeError as exc:
        print(f"surge benchmark: error: {exc}", file=sys.stderr)
        return 1
    result["command"] = " ".join(["python", *sys.argv])
    folder = os.path.join(args.results, time.strftime("surge-%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(folder, exist_ok=True)
    text = table(result)
    for name, content in (("surge.json", to_json(result)), ("surge.txt", text + "\n")):
        with open(os.path.join(folder, name), "w") as f:
            f.write(content)
    png = os.path.join(folder, "surge.png")
    plot(result, png)
    if args.plot_copy:
        shutil.copyfile(png, args.plot_copy)
    print(text)
    print(f"\nresults: {folder}/surge.json, surge.txt, surge.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
