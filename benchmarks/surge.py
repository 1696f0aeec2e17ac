"""The surge replay with every knob exposed; writes JSON and a PNG plot of both runs.

    python benchmarks/surge.py                                  # SQLite, L1 only
    python benchmarks/surge.py --database-url postgresql://postgres@127.0.0.1:5432/test \
        --private-redis --repeat 3 --plot-copy docs/img/surge.png   # docs/benchmarks.md
    python benchmarks/surge.py --database-url postgresql://postgres@127.0.0.1:5432/test \
        --private-cluster --repeat 3                 # the same on a 3-primary Redis Cluster

The engine is ``cachelayer.surge`` (the same one ``cachelayer surge`` runs). Every figure is
measured in this run; the no-cache run is the baseline the cached run is compared with.
Shared machines are noisy, so ``--repeat N`` replays N times and prints min/median/max of
the headline figures and how often each target was met; the full table and the plot are
those of the median repeat (by the cached run's p99). Results go to
``results/surge-<UTC time>/`` (``surge.json`` with every repeat, ``surge.txt``, ``surge.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from cachelayer.cli import cache_option
from cachelayer.surge.app import quiet_cache_warnings
from cachelayer.surge.plot import plot
from cachelayer.surge.replay import run
from cachelayer.surge.report import table, to_json
from cachelayer.surge.scenario import Scenario, SurgeError


def knobs(parser: argparse.ArgumentParser) -> None:
    """One flag per Scenario field, named after it, defaulting to it."""
    for field in dataclasses.fields(Scenario):
        if field.name == "cache_options":
            continue  # --cache-option KEY=VALUE, below
        default = field.default
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(default), default=default, help=f"(default {default})")


@contextlib.contextmanager
def redis_for(args: argparse.Namespace) -> Iterator[str | None]:
    if args.private_cluster:
        from cachelayer._cluster_testing import RedisClusterServer

        with RedisClusterServer(primaries=3) as cluster:
            yield cluster.cache_url
        return
    if not args.private_redis:
        yield args.redis_url
        return
    from cachelayer.testing import RedisServer

    with RedisServer() as server:
        yield server.url


FIGURES: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
    ("p99 (ms)", lambda run: run["p99_ms"]),
    ("failed requests", lambda run: run["requests"] - run["ok"]),
    ("DB queries", lambda run: run["db_queries"]),
    ("pool timeouts", lambda run: run["pool_timeouts"]),
    ("Redis errors", lambda run: (run["cache"] or {}).get("backend_errors", 0)),
]


def repeats_summary(results: list[dict[str, Any]]) -> str:
    lines = [f"{f'over {len(results)} repeats:':<34}{'min':>10}{'median':>10}{'max':>10}"]
    for i, name in enumerate(("no cache", "cachelayer")):
        for label, figure in FIGURES:
            values = [float(figure(r["runs"][i])) for r in results]
            lo, med, hi = min(values), statistics.median(values), max(values)
            lines.append(f"  {name + ' ' + label:<32}{lo:>10,.1f}{med:>10,.1f}{hi:>10,.1f}")
    lines.append("targets met:")
    for i, target in enumerate(results[0]["targets"]):
        met = sum(r["targets"][i]["met"] for r in results)
        lines.append(f"  {met} of {len(results)}  {target['run']}: {target['target']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    knobs(parser)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument(
        "--private-redis", action="store_true", help="start a throwaway redis-server for the run"
    )
    parser.add_argument(
        "--private-cluster",
        action="store_true",
        help="start a throwaway 3-primary Redis Cluster for the run (redis+cluster:// URL)",
    )
    parser.add_argument("--serve", action="store_true", help="uvicorn + out-of-process load")
    parser.add_argument(
        "--cache-option",
        action="append",
        default=[],
        type=cache_option,
        metavar="KEY=VALUE",
        help="another Cache() keyword for the cached run, e.g. origin_limit=8 (repeatable)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="replays to run (default 1)")
    parser.add_argument("--results", default="results", help="folder for the run's folder")
    parser.add_argument("--plot-copy", help="also copy the PNG here (e.g. docs/img/surge.png)")
    args = parser.parse_args()
    quiet_cache_warnings()
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be from 1 to 20")
    if args.private_cluster and args.private_redis:
        parser.error("--private-redis and --private-cluster: choose one")
    results = []
    try:
        knobs_given = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(Scenario)
            if f.name != "cache_options"
        }
        sc = Scenario(**knobs_given, cache_options=dict(args.cache_option))
        with redis_for(args) as redis_url:
            for _ in range(args.repeat):
                results.append(
                    run(sc, database_url=args.database_url, redis_url=redis_url, serve=args.serve)
                )
    except SurgeError as exc:
        print(f"surge benchmark: error: {exc}", file=sys.stderr)
        return 1
    order = sorted(range(len(results)), key=lambda i: results[i]["runs"][1]["p99_ms"])
    shown = order[len(order) // 2]
    command = " ".join(["python", *sys.argv])
    text = table(results[shown])
    if len(results) > 1:
        text = (
            f"{repeats_summary(results)}\n\nmedian repeat ({shown + 1} of {len(results)}):\n{text}"
        )
    folder = os.path.join(args.results, time.strftime("surge-%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(folder, exist_ok=True)
    document = {"command": command, "median_repeat": shown, "repeats": results}
    for name, content in (
        ("surge.json", to_json(document)),
        ("surge.txt", f"$ {command}\n{text}\n"),
    ):
        with open(os.path.join(folder, name), "w") as f:
            f.write(content)
    png = os.path.join(folder, "surge.png")
    plot(results[shown], png)
    if args.plot_copy:
        shutil.copyfile(png, args.plot_copy)
    print(f"$ {command}\n{text}")
    print(f"\nresults: {folder}/surge.json, surge.txt, surge.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
