"""Which sent message (and so which account) a report is about: the VERP bounce address first, whose
tag proves postmesh made it, then the original Message-ID the report quotes. Never a guess: what maps
to nothing says why, and a forged or tampered bounce address maps to nothing at all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from postmesh.common.addresses import address_key
from postmesh.common.verp import VerpKey, looks_like_bounce_address, parse_bounce_address
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.inbound.report import Kind, Recipient, Report
from services.feedback.inbound.storage import SentMessages


@dataclass
class Mapping:
    account_id: str = ""
    mail: ev.Mail | None = None
    # How it mapped, or why it did not.
    how: str = ""
    recipients: list[Recipient] = field(default_factory=list)

    @property
    def mapped(self) -> bool:
        return self.mail is not None


def _key(address: str) -> str:
    try:
        return address_key(address)
    except Exception:
        return address.strip().lower()


async def map_report(
    report: Report, envelope_recipients: Sequence[str], messages: SentMessages, verp_key: VerpKey
) -> Mapping:
    verp_recipient: str | None = None
    row = None
    how = ""
    for address in [*envelope_recipients, report.original_return_path]:
        if not address or not looks_like_bounce_address(address):
            continue
        parsed = parse_bounce_address(address, verp_key)
        if parsed is None:
            return Mapping(how=f"bounce address {address} has no valid tag (forged or tampered)")
        row = await messages.by_id(parsed.message_id)
        if row is None:
            return Mapping(how=f"bounce address names message {parsed.message_id}, which is not known")
        verp_recipient = parsed.recipient
        how = f"VERP bounce address {address}"
        break
    if row is None and report.original_message_id:
        row = await messages.by_header(report.original_message_id)
        how = f"original Message-ID <{report.original_message_id}>"
    if row is None:
        if report.original_message_id:
            return Mapping(how=f"no sent message has Message-ID <{report.original_message_id}>")
        return Mapping(how="no bounce address and no original Message-ID in the report")
    mail = ev.Mail.FromString(row.mail)
    recipients = _recipients(report, list(mail.destination), verp_recipient)
    if not recipients:
        return Mapping(
            account_id=row.account_id,
            how=f"{how} maps to message {mail.message_id}, but the report names none of its recipients",
        )
    return Mapping(account_id=row.account_id, mail=mail, how=how, recipients=recipients)


def _recipients(report: Report, destinations: list[str], verp_recipient: str | None) -> list[Recipient]:
    """The report's recipients that the message was sent to: a report never names anyone else."""
    sent_to = {_key(d): d for d in destinations}
    named = [r for r in report.recipients if _key(r.address) in sent_to]
    for recipient in named:
        recipient.address = sent_to[_key(recipient.address)]
    if verp_recipient is not None and _key(verp_recipient) in sent_to:
        # The bounce address names the recipient for certain; an auto-reply's From may be an alias.
        only = sent_to[_key(verp_recipient)]
        mine = [r for r in named if _key(r.address) == _key(only)]
        if mine:
            return mine
        template = report.recipients[0] if report.recipients else Recipient(address=only)
        return [
            Recipient(only, template.action, template.status, template.diagnostic_code, template.remote_mta)
        ]
    if not named and report.kind is Kind.COMPLAINT and len(destinations) == 1:
        # Providers redact the complainer's address; a message sent to one recipient names it anyway.
        return [Recipient(address=destinations[0], action="complained")]
    return named
