"""Delivery retry policy as data, and the one pure function that decides the next attempt."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from postmesh.common.config import Settings


@dataclass(frozen=True)
class RetryPolicy:
    base_minutes: float = 5.0
    max_minutes: float = 240.0
    # Used when a queued message carries no expire time of its own.
    max_age: dt.timedelta = dt.timedelta(hours=24)

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            base_minutes=settings.retry_base_minutes,
            max_minutes=settings.retry_max_minutes,
            max_age=dt.timedelta(hours=settings.delivery_max_age_hours),
        )

    def delay_after(self, attempt: int) -> dt.timedelta:
        """How long to wait after failed attempt number `attempt` (0 = the first): base * 2^attempt,
        capped at max_minutes."""
        exponent = min(max(attempt, 0), 32)  # 2^32 * any base is past every sane cap
        return dt.timedelta(minutes=min(self.base_minutes * 2**exponent, self.max_minutes))

    def next_attempt(self, attempt: int, now: dt.datetime, expire_time: dt.datetime) -> dt.datetime | None:
        """When to try again after failed attempt `attempt`, or None when that would be past the
        message's time-to-live (its remaining recipients then bounce)."""
        when = now + self.delay_after(attempt)
        return when if when < expire_time else None
