"""Delivery workers: take queued messages off POSTMESH_OUTBOUND, sign them, deliver them, and turn
every recipient's outcome into one event.

Retries. A message whose recipients are all done (delivered or bounced) is acked. Recipients that
failed transiently are re-queued as a new QueuedMessage (same message id and MIME, attempt + 1,
not_before = the retry policy's next attempt), then the original is acked. A worker handed a message
before its not_before naks it with exactly the remaining delay, so JetStream itself holds it until
then: nothing polls, and since both the schedule (not_before, in the message) and the message
(in the file-backed stream) live in JetStream, a restart of any worker or of NATS loses no retry.
The re-queue is de-duplicated by its Nats-Msg-Id (message id and attempt) should a worker die
between re-queueing and acking.

Crash safety. Messages are acked only after their outcome is published; a worker killed mid-delivery
leaves its messages unacked, and JetStream hands them to another worker after the ack wait (a
delivering worker reports progress meanwhile). The MIME, Message-ID included, comes from the queue,
so a redelivered message is the same message; at worst a recipient gets it twice, never zero times.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from postmesh.common.bounces import classify
from postmesh.common.bus import EventPublisher, fetch_batch, new_event
from postmesh.common.outbound import enqueue, forget_mime, load_mime
from postmesh.common.protoutil import from_timestamp, timestamp
from postmesh.common.service import Clock
from postmesh.common.streams import OUTBOUND, OUTBOUND_SUBJECT_PREFIX
from postmesh.common.verp import VerpKey, bounce_address
from postmesh.events.v1 import events_pb2 as ev
from postmesh.sender.v1 import queue_pb2
from services.sender.backoff import RetryPolicy
from services.sender.dkim_signing import SigningConfigCache, SigningUnavailable, sign_message, to_crlf
from services.sender.transport import DELAY_INTERNAL, Envelope, Kind, Outcome, Transport

log = logging.getLogger(__name__)

DURABLE = "sender-delivery"


@dataclass(frozen=True)
class DeliveryConfig:
    concurrency: int
    bounce_domain: str
    reporting_mta: str
    policy: RetryPolicy
    verp_key: VerpKey
    ack_wait_seconds: float = 60.0
    fetch_batch: int = 64
    shutdown_grace_seconds: float = 10.0


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class DeliveryWorker:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        events: EventPublisher,
        signing: SigningConfigCache,
        transport: Transport,
        config: DeliveryConfig,
        clock: Clock,
    ) -> None:
        self.js = js
        self.events = events
        self.signing = signing
        self.transport = transport
        self.config = config
        self.clock = clock
        self._inflight: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=DURABLE,
            filter_subject=f"{OUTBOUND_SUBJECT_PREFIX}.>",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.config.ack_wait_seconds,
            # Every nak of a not-yet-due retry counts as a delivery: never give up on a message.
            max_deliver=-1,
            # Deferred retries wait as pending (nak'd with a delay): let many wait while new mail flows.
            max_ack_pending=1_000_000,
        )

    async def run(self) -> None:
        """Pulls and delivers until cancelled, with at most `concurrency` messages in hand."""
        # Creates the shared durable consumer, or brings its configuration up to date.
        await self.js.add_consumer(OUTBOUND.name, self.consumer_config())
        sub = await self.js.pull_subscribe_bind(durable=DURABLE, stream=OUTBOUND.name)
        try:
            while True:
                while len(self._inflight) >= self.config.concurrency:
                    self._slot_free.clear()
                    await self._slot_free.wait()
                want = min(self.config.fetch_batch, self.config.concurrency - len(self._inflight))
                for msg in await fetch_batch(sub, want, wait_seconds=5.0):
                    task = asyncio.create_task(self._handle(msg))
                    self._inflight.add(task)
                    task.add_done_callback(self._done)
        finally:
            # On shutdown, let deliveries in hand finish (fewer duplicates); what does not finish in
            # time is left unacked and goes to another worker.
            if self._inflight:
                await asyncio.wait(set(self._inflight), timeout=self.config.shutdown_grace_seconds)
            for task in list(self._inflight):
                task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
            await sub.unsubscribe()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slot_free.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())

    async def _handle(self, msg: Msg) -> None:
        try:
            queued = queue_pb2.QueuedMessage.FromString(msg.data)
        except Exception:
            log.error("unreadable queued message dropped", extra={"subject": msg.subject})
            await msg.term()
            return
        not_before = from_timestamp(queued.not_before)
        now = self.clock.now()
        if not_before is not None and not_before > now:
            await msg.nak(delay=(not_before - now).total_seconds())
            return
        heartbeat = asyncio.create_task(self._keep_alive(msg))
        try:
            await self.deliver(queued)
        except Exception:
            # Unexpected (a bug, or NATS gone): leave it to JetStream to hand out again, a little later.
            log.exception("delivery failed; the message will be redelivered", extra={"id": queued.message_id})
            heartbeat.cancel()
            await msg.nak(delay=min(self.config.ack_wait_seconds, 30.0))
            return
        finally:
            heartbeat.cancel()
        await msg.ack()

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.config.ack_wait_seconds / 3)
            await msg.in_progress()

    # ---- one message ------------------------------------------------------------------------

    def _expire_time(self, queued: queue_pb2.QueuedMessage, now: dt.datetime) -> dt.datetime:
        expire = from_timestamp(queued.expire_time)
        if expire is not None:
            return expire
        return (from_timestamp(queued.accepted_time) or now) + self.config.policy.max_age

    async def deliver(self, queued: queue_pb2.QueuedMessage) -> None:
        """One attempt at every remaining recipient; publishes one event per recipient outcome and
        re-queues those to retry. Returns once the message needs nothing more from this worker."""
        started = self.clock.now()
        expire = self._expire_time(queued, started)
        recipients = list(dict.fromkeys(queued.recipients))
        if started >= expire:
            await self._expire(queued, recipients, "message expired before it could be delivered")
            await forget_mime(self.js, queued)
            return
        outcomes = await self._attempt(queued, recipients)
        now = self.clock.now()
        retry: list[str] = []
        for recipient in recipients:
            outcome = outcomes[recipient]
            if outcome.kind is Kind.DELIVERED:
                await self._publish_delivery(queued, recipient, outcome, now)
            elif outcome.kind is Kind.PERMANENT:
                await self._publish_bounce(queued, recipient, outcome, ev.BOUNCE_TYPE_PERMANENT, now)
            else:
                retry.append(recipient)
        if retry:
            next_time = self.config.policy.next_attempt(queued.attempt, now, expire)
            if next_time is None:
                for recipient in retry:
                    await self._publish_bounce(
                        queued, recipient, outcomes[recipient], ev.BOUNCE_TYPE_TRANSIENT, now
                    )
            else:
                again = queue_pb2.QueuedMessage()
                again.CopyFrom(queued)
                del again.recipients[:]
                again.recipients.extend(retry)
                again.attempt = queued.attempt + 1
                again.not_before.FromDatetime(next_time)
                if not again.HasField("expire_time"):
                    again.expire_time.FromDatetime(expire)
                await enqueue(self.js, again)
                for recipient in retry:
                    await self._publish_delay(queued, recipient, outcomes[recipient], expire, next_time, now)
                return  # the body is still needed
        await forget_mime(self.js, queued)

    async def _attempt(self, queued: queue_pb2.QueuedMessage, recipients: list[str]) -> dict[str, Outcome]:
        try:
            config = await self.signing.get(
                queued.identity_owner_account_id or queued.account_id, _domain(queued.from_address)
            )
        except SigningUnavailable as exc:
            failed = Outcome(
                Kind.TRANSIENT, f"451 4.3.0 DKIM keys unavailable: {exc}", "4.3.0", delay_type=DELAY_INTERNAL
            )
            return dict.fromkeys(recipients, failed)
        mime = to_crlf(await load_mime(self.js, queued))
        # Signed once per message: a DKIM signature does not depend on the envelope.
        signed = (
            sign_message(mime, config)
            if len(mime) < 1 << 18
            else await asyncio.to_thread(sign_message, mime, config)
        )
        require_tls = queued.tls_policy == queue_pb2.TLS_POLICY_REQUIRE
        groups: dict[str, list[str]] = {}
        for recipient in recipients:
            key = _domain(recipient) if self.transport.groups_by_domain else ""
            groups.setdefault(key, []).append(recipient)
        bounce_domain = queued.mail_from_domain or self.config.bounce_domain

        async def one(domain: str, group: list[str]) -> dict[str, Outcome]:
            envelope = Envelope(
                message_id=queued.message_id,
                # VERP names the recipient when the transaction has one (see postmesh.common.verp).
                mail_from=bounce_address(
                    queued.message_id,
                    group[0] if len(group) == 1 else None,
                    bounce_domain,
                    self.config.verp_key,
                ),
                recipients=tuple(group),
                domain=domain or _domain(group[0]),
                require_tls=require_tls,
            )
            return await self.transport.deliver(envelope, signed)

        results = await asyncio.gather(*(one(domain, group) for domain, group in groups.items()))
        outcomes: dict[str, Outcome] = {}
        for result in results:
            outcomes.update(result)
        return outcomes

    async def _expire(self, queued: queue_pb2.QueuedMessage, recipients: list[str], why: str) -> None:
        now = self.clock.now()
        outcome = Outcome(Kind.TRANSIENT, f"451 4.4.7 {why}", "4.4.7")
        for recipient in recipients:
            await self._publish_bounce(queued, recipient, outcome, ev.BOUNCE_TYPE_TRANSIENT, now)

    # ---- events ------------------------------------------------------------------------------

    def _mail(self, queued: queue_pb2.QueuedMessage) -> ev.Mail:
        mail = ev.Mail(
            message_id=queued.message_id,
            source=queued.from_address,
            sending_account_id=queued.account_id,
            destination=list(queued.recipients),
            tags=list(queued.tags),
            configuration_set_name=queued.configuration_set_name,
            subject=queued.subject,
            source_identity=queued.from_identity,
            headers=list(queued.headers),
            headers_truncated=queued.headers_truncated,
            feedback_forwarding_address=queued.feedback_forwarding_address,
        )
        if queued.HasField("accepted_time"):
            mail.timestamp.CopyFrom(queued.accepted_time)
        return mail

    async def _publish(self, queued: queue_pb2.QueuedMessage, email: ev.EmailEvent, now: dt.datetime) -> None:
        email.mail.CopyFrom(self._mail(queued))
        await self.events.publish(new_event(queued.account_id, time=now, email=email))

    async def _publish_delivery(
        self, queued: queue_pb2.QueuedMessage, recipient: str, outcome: Outcome, now: dt.datetime
    ) -> None:
        accepted = from_timestamp(queued.accepted_time) or now
        delivery = ev.Delivery(
            timestamp=timestamp(now),
            processing_time_millis=max(0, int((now - accepted).total_seconds() * 1000)),
            recipients=[recipient],
            smtp_response=outcome.response,
            reporting_mta=self.config.reporting_mta,
            remote_mta_ip=outcome.remote_ip,
        )
        await self._publish(
            queued, ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_DELIVERY, delivery=delivery), now
        )

    async def _publish_bounce(
        self,
        queued: queue_pb2.QueuedMessage,
        recipient: str,
        outcome: Outcome,
        bounce_type: ev.BounceType.ValueType,
        now: dt.datetime,
    ) -> None:
        sub_type = ev.BOUNCE_SUB_TYPE_GENERAL
        if bounce_type == ev.BOUNCE_TYPE_PERMANENT:
            # A 5xx reply is final, but SES files some (full mailbox, too large...) as Transient.
            classified = classify(outcome.status, outcome.response)
            bounce_type, sub_type = classified.bounce_type, classified.bounce_sub_type
            if bounce_type == ev.BOUNCE_TYPE_UNDETERMINED:
                bounce_type, sub_type = ev.BOUNCE_TYPE_PERMANENT, ev.BOUNCE_SUB_TYPE_GENERAL
        bounce = ev.Bounce(
            bounce_type=bounce_type,
            bounce_sub_type=sub_type,
            bounced_recipients=[
                ev.BouncedRecipient(
                    email_address=recipient,
                    action="failed",
                    status=outcome.status,
                    diagnostic_code=f"smtp; {outcome.response}",
                )
            ],
            timestamp=timestamp(now),
            feedback_id=uuid.uuid4().hex,
            reporting_mta=f"dns; {self.config.reporting_mta}",
            remote_mta_ip=outcome.remote_ip,
        )
        await self._publish(queued, ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_BOUNCE, bounce=bounce), now)

    async def _publish_delay(
        self,
        queued: queue_pb2.QueuedMessage,
        recipient: str,
        outcome: Outcome,
        expire: dt.datetime,
        next_time: dt.datetime,
        now: dt.datetime,
    ) -> None:
        delay = ev.DeliveryDelay(
            delay_type=outcome.delay_type or "Undetermined",
            delayed_recipients=[
                ev.DelayedRecipient(
                    email_address=recipient,
                    status=outcome.status,
                    diagnostic_code=f"smtp; {outcome.response}",
                )
            ],
            expiration_time=timestamp(expire),
            reporting_mta=f"dns; {self.config.reporting_mta}",
            timestamp=timestamp(now),
            attempt=queued.attempt + 1,
            next_attempt_time=timestamp(next_time),
        )
        await self._publish(
            queued, ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY, delivery_delay=delay), now
        )
