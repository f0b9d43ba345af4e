"""The verification message for address identities, queued like every other message."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import format_datetime
from urllib.parse import quote

from nats.js import JetStreamContext

from postmesh.common.addresses import domain_of
from postmesh.common.mailformat import new_message_id, system_message
from postmesh.common.outbound import enqueue
from postmesh.common.service import Clock
from postmesh.sender.v1 import queue_pb2

SUBJECT = "postmesh Email Address Verification Request"


def confirmation_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/confirm?token={quote(token)}"


class VerificationMailer:
    """Queues verification messages from the system address (owned by the system account)."""

    def __init__(
        self,
        js: JetStreamContext,
        clock: Clock,
        *,
        system_account_id: str,
        system_address: str,
        link_base: Callable[[], str],
        message_id_domain: str = "",
    ) -> None:
        self._js = js
        self._clock = clock
        self._account_id = system_account_id
        self._from = system_address
        self._link_base = link_base
        self._message_id_domain = message_id_domain

    def build(self, address: str, token: str, expires_at: dt.datetime) -> EmailMessage:
        link = confirmation_link(self._link_base(), token)
        message = EmailMessage()
        message["From"] = self._from
        message["To"] = address
        message["Subject"] = SUBJECT
        message["Date"] = format_datetime(self._clock.now())
        message["Auto-Submitted"] = "auto-generated"
        text = (
            "Someone asked to send email from this address with postmesh.\n\n"
            f"To confirm that you own {address}, open this link:\n\n{link}\n\n"
            f"or run:  postmesh identity confirm {token}\n\n"
            f"The link expires at {expires_at:%Y-%m-%d %H:%M} UTC and works once.\n"
            "If you did not ask for this, ignore this message: nothing is sent from your address.\n"
        )
        # 7bit when it can be (an ASCII address): the link stays whole and clickable in a text viewer,
        # where quoted-printable would break it with soft line breaks and =3D.
        cte = "7bit" if text.isascii() and max(map(len, text.splitlines())) <= 998 else None
        message.set_content(text, cte=cte)
        return message

    async def send_verification(self, address: str, token: str, expires_at: dt.datetime) -> None:
        message = self.build(address, token, expires_at)
        message_id = new_message_id(self._clock.now())
        mime = system_message(
            message, message_id=message_id, sender=self._from, message_id_domain=self._message_id_domain
        )
        queued = queue_pb2.QueuedMessage(
            message_id=message_id,
            account_id=self._account_id,
            from_address=self._from,
            from_identity=domain_of(self._from),
            identity_owner_account_id=self._account_id,
            recipients=[address],
            mime=mime,
            subject=SUBJECT,
            tls_policy=queue_pb2.TLS_POLICY_OPTIONAL,
        )
        queued.accepted_time.FromDatetime(self._clock.now())
        # Delivering a link after it has expired helps nobody.
        queued.expire_time.FromDatetime(expires_at)
        await enqueue(self._js, queued)
