"""One piece of returned mail, start to end: parse it, map it to the message it is about, then publish
the Bounce or Complaint events SES would, or keep it for an operator with the reason. Nothing is
ever sent in reply (a bounce of a bounce would loop)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from postmesh.common.bounces import Classification, classify
from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.protoutil import timestamp
from postmesh.common.service import Clock
from postmesh.common.verp import VerpKey
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.inbound.mapping import Mapping, map_report
from services.feedback.inbound.parsing import parse_report
from services.feedback.inbound.report import Kind, Recipient, Report
from services.feedback.inbound.storage import KeptReports, SentMessages

log = logging.getLogger(__name__)

_IP = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")


def recipient_class(report: Report, recipient: Recipient) -> Classification:
    if report.auto_reply:
        return Classification(ev.BOUNCE_TYPE_TRANSIENT, ev.BOUNCE_SUB_TYPE_GENERAL)
    return classify(recipient.status, recipient.diagnostic_code)


@dataclass
class Outcome:
    report: Report
    mapping: Mapping
    events: list[ev.Event] = field(default_factory=list)
    kept_id: str = ""

    @property
    def reason(self) -> str:
        """Why nothing is recorded: empty when events are."""
        if self.events:
            return ""
        if self.report.kind is Kind.NONE:
            return self.report.reason
        return self.mapping.how


class InboundProcessor:
    def __init__(
        self,
        *,
        messages: SentMessages,
        kept: KeptReports,
        events: EventPublisher | None,
        verp_key: VerpKey,
        clock: Clock,
        feedback_loop_address: str,
    ) -> None:
        self._messages = messages
        self._kept = kept
        self._events = events
        self._verp_key = verp_key
        self._clock = clock
        self._fbl = feedback_loop_address.lower()

    async def classify(self, raw: bytes, mail_from: str = "", rcpt_to: Sequence[str] = ()) -> Outcome:
        """What `raw` would record, without recording it (the operator's dry run, and step one)."""
        to_fbl = any(r.lower() == self._fbl for r in rcpt_to)
        parse = functools.partial(
            parse_report,
            raw,
            null_sender=not mail_from,
            to_feedback_loop=to_fbl,
            own_addresses={self._fbl, *rcpt_to},
        )
        # A large report is parsed off the event loop, which serves gRPC and the other consumers.
        report = parse() if len(raw) < 1 << 18 else await asyncio.to_thread(parse)
        if report.kind is Kind.NONE:
            return Outcome(report, Mapping(how=report.reason))
        mapping = await map_report(report, rcpt_to, self._messages, self._verp_key)
        outcome = Outcome(report, mapping)
        if mapping.mail is not None:
            outcome.events = self._events_for(raw, report, mapping)
        return outcome

    async def process(self, raw: bytes, mail_from: str, rcpt_to: Sequence[str]) -> Outcome:
        outcome = await self.classify(raw, mail_from, rcpt_to)
        if not outcome.events:
            outcome.kept_id = await self._kept.keep(
                raw=raw,
                mail_from=mail_from,
                rcpt_to=rcpt_to,
                fmt=outcome.report.format,
                reason=outcome.reason,
            )
            log.info("inbound report kept", extra={"id": outcome.kept_id, "reason": outcome.reason})
            return outcome
        await self.publish(outcome)
        return outcome

    async def publish(self, outcome: Outcome) -> None:
        assert self._events is not None
        for event in outcome.events:
            await self._events.publish(event)

    def _events_for(self, raw: bytes, report: Report, mapping: Mapping) -> list[ev.Event]:
        assert mapping.mail is not None
        now = self._clock.now()
        # The same report delivered twice publishes the same event ids: JetStream drops the copy.
        digest = hashlib.sha256(
            b"%s\0%s\0%s" % (mapping.account_id.encode(), mapping.mail.message_id.encode(), raw)
        ).hexdigest()[:24]
        if report.kind is Kind.COMPLAINT:
            complaint = ev.Complaint(
                complained_recipients=[
                    ev.ComplainedRecipient(email_address=r.address) for r in mapping.recipients
                ],
                timestamp=timestamp(now),
                feedback_id=uuid.uuid4().hex,
                complaint_feedback_type=report.feedback_type,
                user_agent=report.user_agent,
            )
            if report.arrival_date is not None:
                complaint.arrival_date.FromDatetime(report.arrival_date)
            event = new_event(
                mapping.account_id,
                time=now,
                email=ev.EmailEvent(
                    event_type=ev.EMAIL_EVENT_TYPE_COMPLAINT, mail=mapping.mail, complaint=complaint
                ),
            )
            event.event_id = f"inbound-{digest}-c"
            return [event]
        groups: dict[Classification, list[Recipient]] = {}
        for recipient in mapping.recipients:
            groups.setdefault(recipient_class(report, recipient), []).append(recipient)
        events = []
        for index, (klass, recipients) in enumerate(groups.items()):
            remote = next((m.group(1) for r in recipients if (m := _IP.search(r.remote_mta))), "")
            bounce = ev.Bounce(
                bounce_type=klass.bounce_type,
                bounce_sub_type=klass.bounce_sub_type,
                bounced_recipients=[
                    ev.BouncedRecipient(
                        email_address=r.address,
                        action=r.action,
                        status=r.status,
                        diagnostic_code=r.diagnostic_code,
                    )
                    for r in recipients
                ],
                timestamp=timestamp(now),
                feedback_id=uuid.uuid4().hex,
                reporting_mta=report.reporting_mta,
                remote_mta_ip=remote,
            )
            event = new_event(
                mapping.account_id,
                time=now,
                email=ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_BOUNCE, mail=mapping.mail, bounce=bounce),
            )
            event.event_id = f"inbound-{digest}-b{index}"
            events.append(event)
        return events

    async def retry(self, report_id: str) -> Outcome:
        """Runs a kept report again (its message may have been indexed since); removes it once it maps."""
        row = await self._kept.get(report_id)
        outcome = await self.classify(row.raw, row.mail_from, [r for r in row.rcpt_to.split("\n") if r])
        if outcome.events:
            await self.publish(outcome)
            await self._kept.remove(report_id)
        else:
            await self._kept.update_reason(report_id, outcome.reason)
            outcome.kept_id = report_id
        return outcome
