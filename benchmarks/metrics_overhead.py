"""What PrometheusMetrics adds to an L1 hit: the same hit, with and without it, in one run.

    python benchmarks/metrics_overhead.py            # about half a minute
    python benchmarks/metrics_overhead.py --quick    # smoke check

Counts are plain integers the core bumps anyway and the observer is never called on a hit,
so the expected overhead is nil; this measures it. Rows are interleaved across repeats (noise
on a shared machine hits every row alike) and reported as ns per call, min/median/max, and
the ratio of medians to the hit without metrics. One scrape of the registry is timed too: it
is what Prometheus costs the process every scrape interval.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from cachelayer import Cache
from cachelayer.metrics import PrometheusMetrics

BASELINE = "cachelayer sync, L1 hit"


def cases() -> tuple[list[tuple[str, Callable[[], Any]]], CollectorRegistry]:
    value = {"id": 42, "name": "product 42", "price": "9.99"}
    registry = CollectorRegistry()
    plain = Cache(None, namespace="plain", ttl=3600)
    metered = Cache(None, namespace="metered", ttl=3600, metrics=PrometheusMetrics(registry))
    out: list[tuple[str, Callable[[], Any]]] = []
    for label, cache in ((BASELINE, plain), (f"{BASELINE}, with PrometheusMetrics", metered)):

        def product(x: int) -> Any:
            return value

        fn = cache.cached()(product)
        out.append((label, lambda fn=fn: fn(42)))
    for label, cache in (
        ("get_or_load, L1 hit", plain),
        ("get_or_load, L1 hit, with metrics", metered),
    ):
        out.append((label, lambda c=cache: c.get_or_load("k", lambda: value)))  # type: ignore[misc]
    for _, call in out:
        call()  # loaded once: every timed call is a hit
    return out, registry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    number, repeat = (20_000, 3) if args.quick else (200_000, 9)
    rows, registry = cases()
    samples: dict[str, list[float]] = {name: [] for name, _ in rows}
    timers = [(name, timeit.Timer(call)) for name, call in rows]
    for _ in range(repeat):
        for name, timer in timers:
            samples[name].append(timer.timeit(number) / number)
    scrape = [timeit.timeit(lambda: generate_latest(registry), number=200) / 200 for _ in range(5)]

    names = list(samples)
    print(f"{'call':50s} {'ns min':>7s} {'median':>7s} {'max':>7s}   with/without, per repeat")
    for i, name in enumerate(names):
        s = samples[name]
        lo, med, hi = (x * 1e9 for x in (min(s), statistics.median(s), max(s)))
        ratio = ""
        if i % 2:  # the row with metrics: paired with the row above, repeat by repeat
            r = [a / b for a, b in zip(s, samples[names[i - 1]], strict=True)]
            ratio = f"{min(r):.3f}/{statistics.median(r):.3f}/{max(r):.3f} (min/median/max)"
        print(f"{name:50s} {lo:7.0f} {med:7.0f} {hi:7.0f}   {ratio}")
    print(
        f"\none scrape of the registry (one cache): "
        f"{min(scrape) * 1e6:.0f}/{statistics.median(scrape) * 1e6:.0f}/"
        f"{max(scrape) * 1e6:.0f} us min/median/max"
    )


if __name__ == "__main__":
    main()
