"""One small cache type for answers worth keeping a short while (API keys, identity's answers to the
sender, DKIM signing configurations): a time to live, a bound on size, and invalidation by key or by
a predicate (a change to a domain drops what was kept for its subdomains too)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Entries expire `ttl_seconds` after they were put; beyond `max_entries` the oldest go first.
    Not thread-safe: each cache lives on one event loop."""

    def __init__(
        self, ttl_seconds: float, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        self._entries.pop(key, None)
        while len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]  # dicts keep insertion order: the oldest
        self._entries[key] = (self._clock() + self.ttl_seconds, value)

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def discard_where(self, predicate: Callable[[K, V], bool]) -> int:
        """Drops every entry for which predicate(key, value) holds; returns how many."""
        doomed = [k for k, (_, v) in self._entries.items() if predicate(k, v)]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()

    def keys(self) -> list[K]:
        now = self._clock()
        return [k for k, (expires, _) in self._entries.items() if expires > now]

    def __len__(self) -> int:
        return len(self.keys())


def within_domain(name: str, domain: str) -> bool:
    """`name` is `domain` or one of its subdomains (case-insensitive)."""
    name, domain = name.lower().rstrip("."), domain.lower().rstrip(".")
    return name == domain or name.endswith("." + domain)
