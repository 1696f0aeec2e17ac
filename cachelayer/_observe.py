"""The metrics observer protocol: how an exporter sees what counters cannot show.

Counts need no observer: they are plain integers on the cache (``Cache.stats()``), read when
an exporter is scraped, so the hit path never calls out. Durations are different: a histogram
needs each observation. Those happen only off the hit path (a load finished, a load waited
for an origin slot), so an observer is called there, and nowhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._cache import Cache


@runtime_checkable
class Observer(Protocol):
    def bind(self, cache: Cache) -> None:
        """Called once, when a ``Cache`` is built with this observer."""

    def load_finished(self, seconds: float, outcome: str) -> None:
        """A loader call ended after ``seconds``: ``outcome`` is "success" or "error"."""

    def origin_waited(self, seconds: float) -> None:
        """A load waited ``seconds`` for an origin guard slot (granted or not)."""


class NullObserver:
    def bind(self, cache: Cache) -> None:
        pass

    def load_finished(self, seconds: float, outcome: str) -> None:
        pass

    def origin_waited(self, seconds: float) -> None:
        pass
