"""Answers of another service kept for a short while: one cache type for every service, dropped whole
when an event says the answers may have changed (IdentityChanged, say)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Answers(Generic[K, V]):
    def __init__(self, clock: Callable[[], float], *, ttl_seconds: float, limit: int = 100_000) -> None:
        self._clock = clock
        self._ttl = ttl_seconds
        self._limit = limit
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < self._clock():
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[key] = (self._clock() + self._ttl, value)

    def clear(self) -> None:
        self._entries.clear()
