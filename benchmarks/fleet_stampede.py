"""A cold key meets a fleet: how many loads, and how long until the last caller is served.

    python benchmarks/fleet_stampede.py [--processes 4] [--callers 250] [--load-ms 50] [--repeat 5]

Each repeat starts PROCESSES real processes, each with CALLERS asyncio tasks, all released at
one wall-clock instant onto one cold key whose loader takes LOAD_MS. It reports the loader
calls across the fleet and, for every caller, the time from the release to its answer. The
same run measures the baseline with leases off (each process loads once: in-process
single-flight only). Uses a private redis-server, or REDIS_URL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import redis

from cachelayer.testing import RedisServer

WORKER = str(Path(__file__).with_name("fleet_worker.py"))


def one_run(
    url: str, ns: str, processes: int, callers: int, load: float, lease: bool
) -> tuple[int, float]:
    start = time.time() + 1.5 + 0.4 * processes  # everyone connected and subscribed first
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                WORKER,
                url,
                ns,
                "cold",
                str(callers),
                "async",
                str(start),
                str(load),
                "10",
                "1" if lease else "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    latencies: list[float] = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        if p.returncode != 0:
            raise SystemExit(f"worker failed: {err}")
        # Latency counts from the release, so a worker that was late to start only makes
        # the figure worse, never better.
        latencies += json.loads(out.strip().splitlines()[-1])["latency"]
    loads = int(redis.Redis.from_url(url).get(f"{ns}:loads") or 0)
    return loads, max(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--callers", type=int, default=250)
    parser.add_argument("--load-ms", type=float, default=50.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    load = args.load_ms / 1000
    url = os.environ.get("REDIS_URL")
    server = None if url else RedisServer().start()
    url = url or server.url  # type: ignore[union-attr]
    results: dict[str, list[tuple[int, float]]] = {"leases on": [], "leases off": []}
    try:
        for r in range(args.repeat):  # interleaved, so drift hits both alike
            for name, lease in (("leases on", True), ("leases off", False)):
                ns = f"stampede{os.getpid()}x{r}{int(lease)}"
                results[name].append(one_run(url, ns, args.processes, args.callers, load, lease))
    finally:
        if server is not None:
            server.stop()
    print(
        f"{args.processes} processes x {args.callers} async callers, one cold key, "
        f"{args.load_ms:.0f} ms loader, {args.repeat} repeats"
    )
    print(f"{'':12s} {'loader calls':>14s}   {'last caller served after release, ms':>38s}")
    print(f"{'':12s} {'min/med/max':>14s}   {'min':>8s} {'median':>8s} {'max':>8s} {'x load':>8s}")
    for name, rows in results.items():
        calls = [c for c, _ in rows]
        last = [t * 1000 for _, t in rows]
        med = statistics.median(last)
        print(
            f"{name:12s} {min(calls):>4d}/{statistics.median(calls):>4.0f}/{max(calls):<4d}   "
            f"{min(last):8.1f} {med:8.1f} {max(last):8.1f} {med / args.load_ms:8.2f}"
        )
    on = results["leases on"]
    ok_calls = all(c == 1 for c, _ in on)
    med_last = statistics.median(t for _, t in on) * 1000
    target = args.load_ms + 25
    print(
        f"\nTarget: 1 loader call (every repeat: {'met' if ok_calls else 'NOT met'}); "
        f"last caller within {target:.0f} ms of release (median {med_last:.1f} ms: "
        f"{'met' if med_last <= target else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
