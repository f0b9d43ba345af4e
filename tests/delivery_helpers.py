"""Helpers for delivery tests: queued messages built as the accept side builds them, and a real
JetStream consumer of the email events one account's messages produce."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import nats
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from postmesh.common.streams import EMAIL_EVENTS_SUBJECT, EVENTS, OUTBOUND
from postmesh.events.v1 import events_pb2 as ev
from postmesh.sender.v1 import queue_pb2
from services.sender.delivery import DURABLE


async def forget_delivery_consumer(nats_url: str) -> None:
    """Deletes the workers' durable consumer, so no test after this one finds the work queue taken
    (a work-queue stream allows one consumer per subject)."""
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().delete_consumer(OUTBOUND.name, DURABLE)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await nc.close()


def new_account_id() -> str:
    return "acct" + uuid.uuid4().hex[:12]


def queued_message(
    account_id: str,
    recipients: list[str],
    *,
    sender: str = "news@example.test",
    subject: str = "Hello",
    body: str = "Hello from postmesh.",
    expire_in: dt.timedelta | None = None,
    tls_policy: int = queue_pb2.TLS_POLICY_OPTIONAL,
) -> queue_pb2.QueuedMessage:
    message_id = uuid.uuid4().hex
    mime = EmailMessage()
    mime["From"] = f"News <{sender}>"
    mime["To"] = ", ".join(recipients)
    mime["Subject"] = subject
    mime["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    mime["Message-ID"] = make_msgid(idstring=message_id, domain=sender.rpartition("@")[2])
    mime.set_content(body)
    queued = queue_pb2.QueuedMessage(
        message_id=message_id,
        account_id=account_id,
        from_address=sender,
        from_identity=sender.rpartition("@")[2],
        identity_owner_account_id=account_id,
        recipients=recipients,
        mime=mime.as_bytes(),
        subject=subject,
        tls_policy=tls_policy,  # type: ignore[arg-type]
    )
    now = dt.datetime.now(dt.UTC)
    queued.accepted_time.FromDatetime(now)
    if expire_in is not None:
        queued.expire_time.FromDatetime(now + expire_in)
    return queued


class EmailEvents:
    """Every email event of one account from the moment it is opened: a real pull consumer."""

    def __init__(self, nats_url: str, account_id: str) -> None:
        self.nats_url = nats_url
        self.account_id = account_id
        self.events: list[ev.Event] = []
        self.nc: NATS | None = None

    async def __aenter__(self) -> EmailEvents:
        self.nc = await nats.connect(self.nats_url)
        self.js = self.nc.jetstream()
        self.sub = await self.js.pull_subscribe(
            EMAIL_EVENTS_SUBJECT,
            stream=EVENTS.name,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, inactive_threshold=60.0),
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.nc is not None
        await self.nc.close()

    async def _pull(self) -> None:
        try:
            messages = await self.sub.fetch(256, timeout=0.5)
        except (TimeoutError, nats.errors.TimeoutError):
            return
        for msg in messages:
            await msg.ack()
            event = ev.Event.FromString(msg.data)
            if event.account_id == self.account_id:
                self.events.append(event)

    async def wait_for(self, done: Callable[[list[ev.Event]], bool], within: float = 60.0) -> list[ev.Event]:
        deadline = time.monotonic() + within
        while not done(self.events):
            if time.monotonic() > deadline:
                raise AssertionError(f"events not as expected after {within}s: {self.summary()}")
            await self._pull()
        return self.events

    def of(self, message_id: str, event_type: int | None = None) -> list[ev.EmailEvent]:
        return [
            e.email
            for e in self.events
            if e.email.mail.message_id == message_id
            and (event_type is None or e.email.event_type == event_type)
        ]

    def summary(self) -> list[tuple[str, str]]:
        return [(e.email.mail.message_id, ev.EmailEventType.Name(e.email.event_type)) for e in self.events]


async def wait_until(condition: Callable[[], bool], within: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
