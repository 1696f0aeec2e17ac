"""Per-process counters: plain integers, bumped without locks or allocation.

``+=`` on an attribute is not atomic across threads, so under heavy threading a count may
come out a little low; that is the price of a hit path with no lock, and it only ever
under-reports. Exporters read these when they are scraped.
"""

from __future__ import annotations


class Stats:
    __slots__ = (
        "backend_errors",
        "breaker_opened",
        "breaker_skips",
        "coalesced",
        "corrupt_entries",
        "early_refreshes",
        "fenced_writes",
        "fleet_coalesced",
        "invalidations_received",
        "invalidations_sent",
        "invalidations_unconfirmed",
        "l1_hits",
        "l2_hits",
        "lease_waits",
        "load_errors",
        "load_timeouts",
        "loads",
        "loads_shed",
        "misses",
        "refreshes",
        "serialization_errors",
        "stale_fail_safe",
        "stale_lease_timeout",
        "stale_overload",
        "stale_soft_timeout",
        "stale_swr",
        "subscription_losses",
    )

    def __init__(self) -> None:
        self.l1_hits = 0  # served fresh from this process's memory
        self.l2_hits = 0  # served fresh from Redis
        self.misses = 0  # callers that found nothing fresh (each then loads or waits)
        self.loads = 0  # loader calls made by this process
        self.load_errors = 0  # loader calls that raised
        self.load_timeouts = 0  # callers that gave up at hard_timeout
        self.loads_shed = 0  # loads refused by the origin guard with nothing stale to serve
        self.coalesced = 0  # callers served by another caller's load in this process
        self.fleet_coalesced = 0  # loads avoided by waiting on another process's lease
        self.lease_waits = 0  # times a flight waited on another process's lease
        self.refreshes = 0  # background refreshes started (stale-while-revalidate, early)
        self.early_refreshes = 0  # of which early (XFetch) refreshes of fresh entries
        self.stale_swr = 0  # stale served while a refresh runs
        self.stale_fail_safe = 0  # stale served because the loader failed
        self.stale_soft_timeout = 0  # stale served because the load passed soft_timeout
        self.stale_overload = 0  # stale served because the origin was saturated
        self.stale_lease_timeout = 0  # stale served after waiting out another's lease
        self.fenced_writes = 0  # loaded values refused because of an invalidation meanwhile
        self.backend_errors = 0  # Redis operations that failed
        self.breaker_opened = 0  # times the circuit breaker opened
        self.breaker_skips = 0  # Redis calls not made because the circuit was open
        self.serialization_errors = 0  # loaded values that could not be encoded
        self.corrupt_entries = 0  # undecodable bytes found in Redis
        self.invalidations_sent = 0  # invalidation changes (calls or batches) sent to Redis
        self.invalidations_unconfirmed = 0  # sent, but too few replicas acknowledged them
        self.invalidations_received = 0  # invalidation messages from other processes
        self.subscription_losses = 0  # times the pub/sub subscription was lost

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in sorted(self.__slots__)}
