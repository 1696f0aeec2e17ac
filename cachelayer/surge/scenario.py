"""What a replay sends: its settings, its phases and its open-loop arrival schedule.

Everything here is pure and seeded, so the no-cache run and the cached run replay exactly the
same requests at exactly the same scheduled instants, and tests can check the schedule
without starting anything.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import random
from collections.abc import Iterator
from typing import Any, NamedTuple

# Hard ceilings: a replay is a bounded experiment, never an accidental load test of a machine.
MAX_DURATION = 600.0
MAX_PEAK_RATE = 20_000.0
MAX_KEYS = 1_000_000


class SurgeError(Exception):
    """A replay cannot start or go on; the message says why, for a person to read."""


class ScenarioError(SurgeError, ValueError):
    """A setting outside what a replay can honestly run; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    start: float  # seconds from the start of the run
    end: float
    slowdown: float = 1.0  # the database holds each connection this many times longer
    fail_share: float = 0.0  # share of queries that fail (injected, after they ran)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """The knobs of one replay; both runs (no cache, cachelayer) share them."""

    duration: float = 12.0  # seconds per run
    rate: float = 60.0  # baseline requests per second
    surge: float = 10.0  # peak rate as a multiple of the baseline
    ramp: float = 1.5  # seconds from baseline to peak
    keys: int = 1000  # products in the catalog (categories: one per 50 products)
    sessions: int = 400  # shoppers with a cart
    zipf_s: float = 1.1  # popularity skew of products and categories
    cart_share: float = 0.15  # share of requests that are /cart lookups
    category_share: float = 0.15  # share that are /categories/{id}
    reviews: int = 300  # reviews per product: the work a catalog query aggregates
    pool_size: int = 10
    pool_timeout: float = 1.0  # an app waits this long for a connection, then answers 503
    request_timeout: float = 2.0  # the client gives up after this long
    ttl: float = 5.0
    stale_ttl: float = 0.0  # handed to Cache(): seconds a stale entry may still be served
    db_delay: float = 0.0  # injected latency per query (models a remote or slower server)
    brownout_slowdown: float = 4.0
    brownout_fail_share: float = 0.2
    seed: int = 1
    # More keyword arguments for the cached run's Cache() (origin_limit, max_stale, ...), so
    # every defence the cache grows can be measured without changing the replay.
    cache_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ScenarioError("; ".join(problems))

    def _problems(self) -> Iterator[str]:
        def positive(name: str, value: float, limit: float = math.inf) -> Iterator[str]:
            if not (isinstance(value, (int, float)) and 0 < value <= limit):
                bound = "" if limit == math.inf else f" and at most {limit:g}"
                yield f"{name} must be greater than 0{bound}, got {value!r}"

        yield from positive("duration", self.duration, MAX_DURATION)
        yield from positive("rate", self.rate)
        yield from positive("surge", self.surge, 1000)
        yield from positive("ttl", self.ttl)
        yield from positive("pool timeout", self.pool_timeout, 60)
        yield from positive("request timeout", self.request_timeout, 60)
        yield from positive("zipf exponent", self.zipf_s, 10)
        yield from positive("brown-out slowdown", self.brownout_slowdown, 100)
        if self.rate * max(self.surge, 1.0) > MAX_PEAK_RATE:
            yield f"peak rate (rate x surge) must be at most {MAX_PEAK_RATE:g} requests/s"
        for name, count, lo in (("keys", self.keys, 1), ("pool size", self.pool_size, 1)):
            if not (isinstance(count, int) and lo <= count <= MAX_KEYS):
                yield f"{name} must be a whole number from {lo} to {MAX_KEYS}, got {count!r}"
        for name, count in (("sessions", self.sessions), ("reviews", self.reviews)):
            if not (isinstance(count, int) and 1 <= count <= 10_000):
                yield f"{name} must be a whole number from 1 to 10000, got {count!r}"
        if self.pool_size > 200:
            yield f"pool size must be at most 200, got {self.pool_size}"
        for name, share in (
            ("cart share", self.cart_share),
            ("category share", self.category_share),
            ("brown-out failure share", self.brownout_fail_share),
        ):
            if not 0 <= share <= 1:
                yield f"{name} must be between 0 and 1, got {share!r}"
        if self.cart_share + self.category_share > 1:
            yield "cart share + category share must be at most 1"
        for name, seconds in (("ramp", self.ramp), ("stale ttl", self.stale_ttl)):
            if not seconds >= 0:
                yield f"{name} must be 0 or more seconds, got {seconds!r}"
        if not 0 <= self.db_delay <= 10:
            yield f"db delay must be between 0 and 10 seconds, got {self.db_delay!r}"

    @property
    def categories(self) -> int:
        return max(1, self.keys // 50)

    @property
    def peak_rate(self) -> float:
        return self.rate * self.surge

    def phases(self) -> list[Phase]:
        """Baseline, ramp, surge, brown-out, recovery: fixed shares of the run's duration.

        The ramp is given in seconds (a campaign goes live in seconds) but never takes more
        than a fifth of the run.
        """
        d = self.duration
        base_end = 0.15 * d
        ramp_end = base_end + min(self.ramp, 0.2 * d)
        brown_start, brown_end = 0.6 * d, 0.8 * d
        return [
            Phase("baseline", 0.0, base_end),
            Phase("ramp", base_end, ramp_end),
            Phase("surge", ramp_end, brown_start),
            Phase(
                "brown-out",
                brown_start,
                brown_end,
                self.brownout_slowdown,
                self.brownout_fail_share,
            ),
            Phase("recovery", brown_end, d),
        ]

    def rate_at(self, t: float) -> float:
        """Requests per second scheduled at ``t`` seconds into the run."""
        phases = self.phases()
        base, ramp = phases[0], phases[1]
        if t < base.end:
            return self.rate
        if t < ramp.end and ramp.end > ramp.start:
            return self.rate + (self.peak_rate - self.rate) * (t - ramp.start) / (
                ramp.end - ramp.start
            )
        return self.peak_rate


class ZipfSampler:
    """Draws ranks 1..n with probability proportional to 1 / rank**s (rank 1 is hottest)."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        if n < 1:
            raise ValueError("a Zipf sampler needs at least one item")
        self._rng = rng
        self._cumulative = list(itertools.accumulate(1.0 / float(k**s) for k in range(1, n + 1)))

    def __call__(self) -> int:
        u = self._rng.random() * self._cumulative[-1]
        return min(bisect.bisect_right(self._cumulative, u), len(self._cumulative) - 1) + 1

    def probability(self, rank: int) -> float:
        below = self._cumulative[rank - 2] if rank > 1 else 0.0
        return (self._cumulative[rank - 1] - below) / self._cumulative[-1]


_COLLECTIONS = {"product": "/products", "category": "/categories"}


class Arrival(NamedTuple):
    at: float  # scheduled send time, seconds from the start of the run
    kind: str  # "product", "category" or "cart"
    ident: int

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.ident}"

    @property
    def path(self) -> str:
        return "/cart" if self.kind == "cart" else f"{_COLLECTIONS[self.kind]}/{self.ident}"


def schedule(sc: Scenario) -> list[Arrival]:
    """The open-loop arrival schedule: Poisson arrivals at ``rate_at(t)``.

    Send times are fixed in advance and never wait for responses, so a slow server cannot
    slow the load down and hide its own overload (coordinated omission).
    """
    rng = random.Random(sc.seed)
    products = ZipfSampler(sc.keys, sc.zipf_s, rng)
    categories = ZipfSampler(sc.categories, sc.zipf_s, rng)
    out: list[Arrival] = []
    t = 0.0
    while True:
        t += rng.expovariate(sc.rate_at(t))
        if t >= sc.duration:
            return out
        u = rng.random()
        if u < sc.cart_share:
            out.append(Arrival(t, "cart", rng.randrange(sc.sessions) + 1))
        elif u < sc.cart_share + sc.category_share:
            out.append(Arrival(t, "category", categories()))
        else:
            out.append(Arrival(t, "product", products()))


def distinct_keys_per_window(arrivals: list[Arrival], ttl: float) -> int:
    """Sum over consecutive TTL windows of the distinct keys requested in each.

    A read-through cache must load each key at least once per lifetime of its entry, so this
    is the floor the cached run's database query count is judged against.
    """
    windows: dict[int, set[str]] = {}
    for a in arrivals:
        windows.setdefault(int(a.at // ttl), set()).add(a.key)
    return sum(len(keys) for keys in windows.values())


def phase_at(phases: list[Phase], t: float) -> Phase:
    for phase in phases:
        if t < phase.end:
            return phase
    return phases[-1]
