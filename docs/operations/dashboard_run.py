"""Draw the dashboard's panels from a real run: docs/img/dashboard.png.

    python docs/operations/dashboard_run.py [--redis-url URL] [--seconds 40] [--out PATH]

A short surge against a real cache (L1 + Redis: ``--redis-url``, else ``$REDIS_URL``, else a
private redis-server) over a real SQLite query behind a 4-connection pool. Phases: baseline,
a surge to 8x, a brown-out (each query also sleeps 40 ms and 30% fail: injected, as in the
surge replay), recovery. Every half second the registry is scraped exactly as Prometheus
would (the text format, parsed back), and each panel is computed from the scrapes with the
PromQL of docs/operations/dashboard.json (``rate()`` over 5 s here instead of 5 minutes).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cachelayer import Cache, CacheError
from cachelayer.metrics import PrometheusMetrics
from cachelayer.testing import RedisServer

KEYS = 3000
POOL = 4
PHASES = [  # (name, share of the run, calls per second, injected delay s, injected failures)
    ("baseline", 0.2, 150, 0.0, 0.0),
    ("surge 8x", 0.3, 1200, 0.0, 0.0),
    ("brown-out", 0.25, 1200, 0.04, 0.3),
    ("recovery", 0.25, 150, 0.0, 0.0),
]


def make_db(path: str) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE reviews (product INTEGER, stars INTEGER)")
    rng = random.Random(1)
    db.executemany(
        "INSERT INTO reviews VALUES (?, ?)",
        ((rng.randrange(KEYS), rng.randrange(1, 6)) for _ in range(60_000)),
    )
    db.commit()
    db.close()


class Origin:
    """A database behind a bounded pool: what the cache protects."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pool = threading.BoundedSemaphore(POOL)
        self.local = threading.local()
        self.delay = 0.0
        self.failures = 0.0
        self.rng = random.Random(2)

    def query(self, product: int) -> dict[str, Any]:
        with self.pool:
            db = getattr(self.local, "db", None)
            if db is None:
                db = self.local.db = sqlite3.connect(self.path)
            row = db.execute(  # a full scan: real work, about a millisecond
                "SELECT count(*), avg(stars) FROM reviews WHERE product = ?", (product,)
            ).fetchone()
            if self.delay:
                time.sleep(self.delay)
            if self.rng.random() < self.failures:
                raise RuntimeError("injected failure")
        return {"id": product, "reviews": row[0], "stars": row[1]}


def scrape(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """(name, label text) -> value, from the text format Prometheus would read."""
    out = {}
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "cache")
            out[s.name, labels] = s.value
    return out


def run(redis_url: str, seconds: float) -> tuple[list[float], list[dict[Any, float]], list[Any]]:
    registry = CollectorRegistry()
    namespace = f"dash-{uuid.uuid4().hex[:8]}"
    cache = Cache(
        redis_url, namespace=namespace, ttl=3, stale_ttl=0, max_stale=30, jitter=0.1,
        origin_limit=POOL, origin_wait=0.05, metrics=PrometheusMetrics(registry),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        make_db(os.path.join(tmp, "shop.db"))
        origin = Origin(os.path.join(tmp, "shop.db"))
        rng = random.Random(3)
        weights = [1 / (i + 1) ** 1.1 for i in range(KEYS)]  # Zipf-like popularity
        times: list[float] = []
        scrapes: list[dict[Any, float]] = []
        marks: list[Any] = []
        stop = threading.Event()

        def scraper() -> None:
            while not stop.is_set():
                times.append(time.monotonic() - t0)
                scrapes.append(scrape(registry))
                stop.wait(0.5)

        def call(product: int) -> None:
            try:
                cache.get_or_load(f"product:{product}", lambda: origin.query(product))
            except (CacheError, RuntimeError):
                pass  # shed or failed: the page would show an error

        t0 = time.monotonic()
        threading.Thread(target=scraper, daemon=True).start()
        with ThreadPoolExecutor(32) as pool:
            for name, share, rate, delay, failures in PHASES:
                marks.append((time.monotonic() - t0, name))
                origin.delay, origin.failures = delay, failures
                end = time.monotonic() + share * seconds
                next_at = time.monotonic()
                while next_at < end:
                    batch = rng.choices(range(KEYS), weights, k=max(1, rate // 100))
                    for product in batch:
                        pool.submit(call, product)
                    next_at += len(batch) / rate
                    time.sleep(max(0.0, next_at - time.monotonic()))
        stop.set()
        time.sleep(0.6)
    cache.close()
    return times, scrapes, marks


def series(
    times: list[float], scrapes: list[dict[Any, float]], window: float = 5.0
) -> dict[str, Any]:
    """The dashboard's panels, computed as PromQL would: rate() over ``window`` seconds."""

    def rate(name: str, labels: str = "") -> list[float]:
        out = []
        for i, t in enumerate(times):
            j = next(k for k, tk in enumerate(times) if tk >= t - window)
            dt = t - times[j]
            a = sum(v for (n, lab), v in scrapes[j].items() if n == name and labels in lab)
            b = sum(v for (n, lab), v in scrapes[i].items() if n == name and labels in lab)
            out.append((b - a) / dt if dt > 0 else 0.0)
        return out

    def gauge(name: str) -> list[float]:
        return [sum(v for (n, _), v in s.items() if n == name) for s in scrapes]

    l1_hit = rate("cachelayer_requests_total", "result=hit,tier=l1")
    l2_hit = rate("cachelayer_requests_total", "result=hit,tier=l2")
    l1_all = rate("cachelayer_requests_total", "tier=l1")
    stale = rate("cachelayer_requests_total", "tier=any")
    miss = rate("cachelayer_requests_total", "result=miss,tier=l1")
    calls = [a + b for a, b in zip(l1_all, stale, strict=True)]
    durations = rate("cachelayer_load_duration_seconds_sum")
    counts = rate("cachelayer_load_duration_seconds_count")
    return {
        "L1 hit ratio": [h / c if c else 0 for h, c in zip(l1_hit, calls, strict=True)],
        "L2 hit ratio (of L1 misses)": [
            h / m if m else 0 for h, m in zip(l2_hit, miss, strict=True)
        ],
        "calls/s": calls,
        "DB queries saved/s": rate("cachelayer_loads_saved_total"),
        "DB queries/s": [
            a + b for a, b in zip(rate("cachelayer_loads_total", "outcome=success"),
                                  rate("cachelayer_loads_total", "outcome=error"), strict=True)
        ],
        "loads shed/s": rate("cachelayer_loads_total", "outcome=shed"),
        "loads in flight": gauge("cachelayer_loads_in_flight"),
        "origin limit": gauge("cachelayer_origin_limit"),
        "stale served/s": stale,
        "mean load ms": [1000 * d / c if c else 0 for d, c in zip(durations, counts, strict=True)],
    }  # fmt: skip


def plot(times: list[float], panels: dict[str, Any], marks: list[Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(5, 1, figsize=(10, 12), sharex=True)
    groups = [
        ("Hit ratio per tier", ["L1 hit ratio", "L2 hit ratio (of L1 misses)"]),
        ("Calls and DB queries per second", ["calls/s", "DB queries saved/s", "DB queries/s"]),
        ("Origin guard: loads in flight vs limit", ["loads in flight", "origin limit"]),
        ("Stale served and loads shed per second", ["stale served/s", "loads shed/s"]),
        ("Load latency (mean, ms)", ["mean load ms"]),
    ]  # fmt: skip
    for ax, (title, names) in zip(axes, groups, strict=True):
        for name in names:
            ax.plot(times, panels[name], label=name)
        for at, phase in marks:
            ax.axvline(at, color="grey", linestyle=":", linewidth=1)
            ax.text(at, 1.0, f" {phase}", transform=ax.get_xaxis_transform(), fontsize=8, va="top")
        ax.set_title(title, fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="center right")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds")
    fig.suptitle("cachelayer dashboard panels from a real run (scraped every 0.5 s, rate over 5 s)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--out", default="docs/img/dashboard.png")
    args = parser.parse_args()
    # The brown-out makes the core log "fail-safe engaged" once per key (reported on issue 8);
    # keep the terminal readable.
    logging.getLogger("cachelayer").setLevel(logging.ERROR)
    server = None
    if not args.redis_url:
        server = RedisServer().start()
        args.redis_url = server.url
    try:
        times, scrapes, marks = run(args.redis_url, args.seconds)
    finally:
        if server is not None:
            server.stop()
    panels = series(times, scrapes)
    plot(times, panels, marks, args.out)
    last = scrapes[-1]
    saved = sum(v for (n, _), v in last.items() if n == "cachelayer_loads_saved_total")
    loads = sum(
        v
        for (n, lab), v in last.items()
        if n == "cachelayer_loads_total" and lab in ("outcome=success", "outcome=error")
    )
    print(f"wrote {args.out}: {len(times)} scrapes; loads saved {saved:.0f}, made {loads:.0f}")
    for (name, labels), v in sorted(last.items()):
        if name in ("cachelayer_stale_served_total", "cachelayer_loads_total"):
            print(f"  {name}{{{labels}}} {v:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
