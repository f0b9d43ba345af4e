"""SES v1 identity notifications: a Bounce, Complaint or Delivery of a message sent from an identity
goes, as SES's `notificationType` JSON, to the webhook destination the identity names for that type.

The identity service owns the settings; they are asked once per identity and kept until an
IdentityChanged event (or 30 s) says they may have changed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from postmesh.events.v1 import events_pb2 as ev


@dataclass(frozen=True)
class NotificationSettings:
    destinations: dict[int, str]  # event type -> "<set>/<destination>"
    headers: dict[int, bool]


NONE = NotificationSettings({}, {})
KINDS = (ev.EMAIL_EVENT_TYPE_BOUNCE, ev.EMAIL_EVENT_TYPE_COMPLAINT, ev.EMAIL_EVENT_TYPE_DELIVERY)
_KEEP_SECONDS = 30.0
_LIMIT = 10_000

Lookup = Callable[[str, str], Awaitable[NotificationSettings]]


class IdentityNotifications:
    def __init__(self, lookup: Lookup, clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup
        self._clock = clock
        self._kept: dict[tuple[str, str], tuple[float, NotificationSettings]] = {}

    def forget(self) -> None:
        self._kept.clear()

    async def target(self, event: ev.Event) -> tuple[str, bool] | None:
        """("<set>/<destination>", headers included) for this event, or None."""
        email = event.email
        identity = email.mail.source_identity
        if email.event_type not in KINDS or not identity:
            return None
        key = (event.account_id, identity)
        kept = self._kept.get(key)
        if kept is None or kept[0] < self._clock():
            if len(self._kept) >= _LIMIT:
                self._kept.clear()
            kept = (self._clock() + _KEEP_SECONDS, await self._lookup(*key))
            self._kept[key] = kept
        settings = kept[1]
        destination = settings.destinations.get(email.event_type, "")
        if not destination:
            return None
        return destination, settings.headers.get(email.event_type, False)
