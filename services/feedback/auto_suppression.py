"""Adds recipients to the account suppression list from bounce and complaint events, as SES does:
a permanent (hard) bounce or a complaint stops further mail to that address from the account, for
the reasons the account chose (its SuppressedReasons; SUPPRESSION_REASONS until it chooses)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from postmesh.common.errors import InvalidArgument
from postmesh.events.v1 import events_pb2
from services.feedback.suppression import SuppressionList

log = logging.getLogger(__name__)


def parse_reasons(setting: str) -> frozenset[str]:
    reasons = frozenset(part.strip().upper() for part in setting.split(",") if part.strip())
    unknown = reasons - {"BOUNCE", "COMPLAINT"}
    if unknown:
        raise ValueError(f"SUPPRESSION_REASONS: unknown reason(s) {sorted(unknown)}")
    return reasons


class AutoSuppression:
    def __init__(
        self, suppression: SuppressionList, reasons_for: Callable[[str], Awaitable[frozenset[str]]]
    ) -> None:
        self._suppression = suppression
        self._reasons_for = reasons_for

    @staticmethod
    def targets(email: events_pb2.EmailEvent, reasons: frozenset[str]) -> tuple[str, list[str], str]:
        """(reason, addresses, feedback id) an event asks to suppress; no addresses when none."""
        if email.event_type == events_pb2.EMAIL_EVENT_TYPE_BOUNCE and "BOUNCE" in reasons:
            bounce = email.bounce
            # Soft bounces retry later; an address already suppressed needs nothing more.
            if bounce.bounce_type != events_pb2.BOUNCE_TYPE_PERMANENT or bounce.bounce_sub_type in (
                events_pb2.BOUNCE_SUB_TYPE_ON_ACCOUNT_SUPPRESSION_LIST,
                events_pb2.BOUNCE_SUB_TYPE_SUPPRESSED,
            ):
                return "BOUNCE", [], ""
            return "BOUNCE", [r.email_address for r in bounce.bounced_recipients], bounce.feedback_id
        if email.event_type == events_pb2.EMAIL_EVENT_TYPE_COMPLAINT and "COMPLAINT" in reasons:
            complaint = email.complaint
            if complaint.complaint_feedback_type == "not-spam":
                return "COMPLAINT", [], ""
            return (
                "COMPLAINT",
                [r.email_address for r in complaint.complained_recipients],
                complaint.feedback_id,
            )
        return "", [], ""

    async def handle(self, event: events_pb2.Event) -> None:
        # The mailbox simulator's bounces and complaints never reach the suppression list.
        if event.WhichOneof("payload") != "email" or not event.account_id or event.email.simulated:
            return
        if event.email.event_type not in (
            events_pb2.EMAIL_EVENT_TYPE_BOUNCE,
            events_pb2.EMAIL_EVENT_TYPE_COMPLAINT,
        ):
            return
        reason, addresses, feedback_id = self.targets(event.email, await self._reasons_for(event.account_id))
        for address in addresses:
            try:
                await self._suppression.put(
                    event.account_id,
                    address,
                    reason,
                    message_id=event.email.mail.message_id,
                    feedback_id=feedback_id,
                )
            except InvalidArgument:
                # A malformed address in a report cannot be suppressed; nothing would be sent to it anyway.
                log.warning("unsuppressible address in event", extra={"event_id": event.event_id})
