"""Turns a fetched tracking URL into an Open or Click event (no HTTP here: see http.py)."""

from __future__ import annotations

import logging

from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.service import Clock
from postmesh.common.tracking import BadToken, TokenSigner, TrackedMail
from postmesh.events.v1 import events_pb2 as ev
from postmesh.events.v1 import tracking_pb2 as tracking_events
from postmesh.sender.v1 import tracking_pb2

log = logging.getLogger(__name__)

# A user agent is recorded as sent, up to this length.
MAX_USER_AGENT = 1024


class TrackingRecorder:
    def __init__(
        self,
        *,
        signer: TokenSigner,
        events: EventPublisher,
        mails: TrackedMail,
        clock: Clock,
    ) -> None:
        self.signer = signer
        self.events = events
        self.mails = mails
        self.clock = clock

    def verify(self, text: str, *, link: bool) -> tracking_pb2.TrackingToken:
        token = self.signer.verify(text)
        if bool(token.link) != link or not token.message_id or not token.account_id:
            raise BadToken("not a token of this kind")
        return token

    async def _mail(self, token: tracking_pb2.TrackingToken) -> ev.Mail:
        """The message's mail object as the delivery worker kept it; its ids alone once it is gone."""
        try:
            mail = await self.mails.recall(token.message_id)
        except Exception:
            log.exception("tracking bucket unavailable", extra={"id": token.message_id})
            mail = None
        # The bucket is keyed by message id only: never lend one account's message to another.
        if mail is None or mail.sending_account_id != token.account_id:
            mail = ev.Mail(message_id=token.message_id, sending_account_id=token.account_id)
        return mail

    async def open(self, text: str, *, ip_address: str, user_agent: str) -> None:
        """Records an Open; BadToken when `text` is not a pixel token of ours."""
        token = self.verify(text, link=False)
        now = self.clock.now()
        detail = tracking_events.Open(ip_address=ip_address, user_agent=user_agent[:MAX_USER_AGENT])
        detail.timestamp.FromDatetime(now)
        email = ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_OPEN, mail=await self._mail(token), open=detail)
        await self.events.publish(new_event(token.account_id, time=now, email=email))

    async def click(self, text: str, *, ip_address: str, user_agent: str) -> str:
        """Records a Click and returns the original link; BadToken when `text` is not a link token of ours."""
        token = self.verify(text, link=True)
        now = self.clock.now()
        detail = tracking_events.Click(
            ip_address=ip_address,
            user_agent=user_agent[:MAX_USER_AGENT],
            link=token.link,
            link_tags=token.link_tags,
        )
        detail.timestamp.FromDatetime(now)
        email = ev.EmailEvent(
            event_type=ev.EMAIL_EVENT_TYPE_CLICK, mail=await self._mail(token), click=detail
        )
        await self.events.publish(new_event(token.account_id, time=now, email=email))
        return token.link
