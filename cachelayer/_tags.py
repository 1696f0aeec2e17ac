"""What this process knows of tag versions.

Tag invalidation never touches entries: it bumps the tag's version in Redis (one INCR) and
every entry that carried the old version stops being served. Each entry records the versions
its load began with; a process checks them against the versions it knows. It learns a
version from Redis the first time it needs it, and forgets it when an invalidation message
says the tag moved, so the next check asks Redis again.

A fetched version is learned only if nothing was forgotten while the fetch was in flight:
otherwise a reply sent just before an invalidation could be taken for the truth just after
it. Without Redis (L1 only) the versions here are the truth and are bumped in place.
"""

from __future__ import annotations

import threading


class TagVersions:
    __slots__ = ("_known", "_lock", "authoritative", "generation", "listening")

    def __init__(self, authoritative: bool) -> None:
        self.authoritative = authoritative
        # Versions are remembered only while invalidation messages can reach us: a process
        # that cannot hear them must ask Redis every time, or it would trust a version that
        # has since moved.
        self.listening = authoritative
        self.generation = 0
        self._known: dict[str, int] = {}
        self._lock = threading.Lock()

    def known(self, tags: tuple[str, ...]) -> tuple[int, ...] | None:
        """The versions of ``tags`` if all are known, else None (ask Redis)."""
        known = self._known
        if self.authoritative:
            return tuple(known.get(t, 0) for t in tags)
        if not self.listening:
            return None
        try:
            return tuple(known[t] for t in tags)
        except KeyError:
            return None

    def learn(self, tags: tuple[str, ...], versions: list[int], generation: int) -> bool:
        with self._lock:
            if generation != self.generation or not self.listening:
                return False
            self._known.update(zip(tags, versions, strict=True))
            return True

    def forget(self, tags: list[str] | tuple[str, ...]) -> None:
        with self._lock:
            self.generation += 1
            for tag in tags:
                if self.authoritative:
                    self._known[tag] = self._known.get(tag, 0) + 1
                else:
                    self._known.pop(tag, None)

    def clear(self, listening: bool) -> None:
        """Forget everything: the subscription that kept us current was lost (``listening``
        False), or is new and we may have missed messages before it."""
        with self._lock:
            self.generation += 1
            if not self.authoritative:
                self._known.clear()
                self.listening = listening

    def current(self, tags: tuple[str, ...], versions: tuple[int, ...]) -> bool:
        """Do these versions (an entry's snapshot) still hold?"""
        return self.known(tags) == versions
