"""Per-process counters: plain integers, bumped without locks or allocation.

``+=`` on an attribute is not atomic across threads, so under heavy threading a count may
come out a little low; that is the price of a hit path with no lock, and it only ever
under-reports. Exporters read these when they are scraped.
"""

from __future__ import annotations


class Stats:
    __slots__ = (
        "backend_errors",
        "coalesced",
        "corrupt_entries",
        "l1_hits",
        "l2_hits",
        "load_errors",
        "loads",
        "misses",
        "serialization_errors",
    )

    def __init__(self) -> None:
        self.l1_hits = 0  # served fresh from this process's memory
        self.l2_hits = 0  # served fresh from Redis
        self.misses = 0  # found fresh in neither tier (each then loads or waits for a load)
        self.loads = 0  # loader calls made by this process
        self.load_errors = 0  # loader calls that raised
        self.coalesced = 0  # callers served by another caller's load (single-flight)
        self.backend_errors = 0  # Redis operations that failed
        self.serialization_errors = 0  # loaded values that could not be encoded
        self.corrupt_entries = 0  # undecodable bytes found in Redis

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in sorted(self.__slots__)}
