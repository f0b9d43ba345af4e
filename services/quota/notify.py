"""Telling an account about a change of its sending state: an AccountChanged event on NATS, and a
mail to the contact addresses it gave in PutAccountDetails, queued like any other message."""

from __future__ import annotations

import datetime as dt
import logging
from email.message import EmailMessage
from email.utils import format_datetime

from nats.js import JetStreamContext

from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.config import Settings
from postmesh.common.mailformat import new_message_id, system_message
from postmesh.common.outbound import enqueue
from postmesh.common.protoutil import timestamp
from postmesh.common.service import Clock
from postmesh.events.v1 import events_pb2
from postmesh.sender.v1 import queue_pb2
from services.quota.models import AccountQuota

log = logging.getLogger(__name__)

# Mail postmesh sends on its own behalf is queued under the system account (identity's, which owns the
# system sending domain), so that its bounces never count against a customer's reputation.
SYSTEM_ACCOUNT_ID = "000000000000"
NOTIFICATION_TTL = dt.timedelta(days=1)

_STATUS_TEXT = {
    "HEALTHY": "healthy",
    "PROBATION": "under review",
    "SHUTDOWN": "paused",
}


def contact_addresses(row: AccountQuota) -> list[str]:
    return [a for a in row.contact_addresses.split("\n") if a]


def sending_state_title(row: AccountQuota) -> str:
    """The title of a notice about the account's enforcement status (paused, under review...)."""
    return f"sending is {_STATUS_TEXT.get(row.enforcement_status, row.enforcement_status)}"


def notification_mime(
    sender: str,
    recipients: list[str],
    row: AccountQuota,
    reason: str,
    now: dt.datetime,
    *,
    title: str,
    message_id: str,
    message_id_domain: str = "",
) -> tuple[str, bytes]:
    status = _STATUS_TEXT.get(row.enforcement_status, row.enforcement_status)
    subject = f"postmesh account {row.account_id}: {title}"
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = format_datetime(now)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(
        f"The sending state of your postmesh account {row.account_id} changed.\n\n"
        f"Reason: {reason}\n\n"
        f"Enforcement status: {status}\n"
        f"Sending enabled: {'yes' if row.sending_enabled else 'no'}\n"
        f"Production access: {'yes' if row.production_access else 'no (sandbox)'}\n"
        f"Quota: {row.max_24_hour_send:g} messages per 24 hours, {row.max_send_rate:g} per second\n"
    )
    return subject, system_message(
        message, message_id=message_id, sender=sender, message_id_domain=message_id_domain
    )


class Notifier:
    def __init__(
        self, events: EventPublisher, js: JetStreamContext, settings: Settings, clock: Clock
    ) -> None:
        self._events = events
        self._js = js
        self._settings = settings
        self._clock = clock

    async def account_changed(self, row: AccountQuota, reason: str, *, title: str) -> None:
        """Publishes the AccountChanged event and queues the notification mail (after the commit),
        titled after what changed ("production access granted", "sending is paused"...)."""
        now = self._clock.now()
        await self._events.publish(
            new_event(
                row.account_id,
                time=now,
                account_changed=events_pb2.AccountChanged(
                    production_access_enabled=row.production_access,
                    sending_enabled=row.sending_enabled,
                    enforcement_status=row.enforcement_status,
                    max_24_hour_send=row.max_24_hour_send,
                    max_send_rate=row.max_send_rate,
                    reason=reason,
                ),
            )
        )
        recipients = contact_addresses(row)
        if not recipients:
            return
        sender = self._settings.notification_from_address
        message_id = new_message_id(now)
        subject, mime = notification_mime(
            sender,
            recipients,
            row,
            reason,
            now,
            title=title,
            message_id=message_id,
            message_id_domain=self._settings.values.get("MESSAGE_ID_DOMAIN", ""),
        )
        queued = queue_pb2.QueuedMessage(
            message_id=message_id,
            account_id=SYSTEM_ACCOUNT_ID,
            from_address=sender,
            from_identity=sender.rpartition("@")[2],
            identity_owner_account_id=SYSTEM_ACCOUNT_ID,
            recipients=recipients,
            mime=mime,
            accepted_time=timestamp(now),
            expire_time=timestamp(now + NOTIFICATION_TTL),
            tls_policy=queue_pb2.TLS_POLICY_OPTIONAL,
            subject=subject,
        )
        await enqueue(self._js, queued)
        log.info("account notified", extra={"account_id": row.account_id, "recipients": len(recipients)})
