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
A worker that sent a message but could not publish its events or have its ack confirmed (NATS went
away) remembers the SMTP outcomes by stream sequence, and finishes the copy JetStream hands back
without sending it again. A second queued copy of a message id (a SendEmail retry that could not tell
whether its first try was stored) is dropped: the first copy a worker takes is recorded in a
key-value bucket (postmesh.common.outbound.first_copy); a message accepted without a request_id
(`queued_once`: a retry of that call makes a new message id) needs no such record.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import dkim
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from opentelemetry.trace import SpanKind

from postmesh.common import jspublish, protoutil, tracing
from postmesh.common.bounces import classify
from postmesh.common.bus import EventPublisher, fetch_batch, new_event
from postmesh.common.mailformat import to_crlf
from postmesh.common.metrics import DELIVERY_OUTCOMES, DELIVERY_RETRIES, DKIM_SIGNING_FAILURES
from postmesh.common.outbound import enqueue, first_copy, forget_mime, load_mime, queued_ledger
from postmesh.common.pull import Puller
from postmesh.common.service import Clock
from postmesh.common.streams import OUTBOUND, OUTBOUND_SUBJECT_PREFIX
from postmesh.common.verp import VerpKey, bounce_address
from postmesh.events.v1 import events_pb2 as ev
from postmesh.sender.v1 import queue_pb2
from services.sender.backoff import RetryPolicy
from services.sender.dkim_signing import SigningConfig, SigningConfigCache, SigningUnavailable, sign_message
from services.sender.filtration.stage import ContentFilters, Verdict
from services.sender.filtration.stage import Kind as ScanKind
from services.sender.simulator import MailboxSimulator, SimulatedBounce
from services.sender.tracking import MessageTracking
from services.sender.transport import DELAY_INTERNAL, Envelope, Kind, Outcome, Transport

log = logging.getLogger(__name__)

DURABLE = "sender-delivery"
# Queued copies whose SMTP outcome is known but whose ack is not confirmed, remembered per worker.
_ATTEMPTED_MEMORY = 100_000
# How long a message whose DKIM keys cannot be fetched (the identity service starting, or its database
# out) waits before a worker tries again: no delivery attempt is made or counted meanwhile.
_SIGNING_KEYS_WAIT_SECONDS = 5.0


def mail_object(queued: queue_pb2.QueuedMessage) -> ev.Mail:
    """SES's "mail" object of a queued message's events."""
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


def reject_event(
    queued: queue_pb2.QueuedMessage, recipients: list[str], filter_name: str, details: str, now: dt.datetime
) -> ev.Event:
    """One Reject for the message (SES's shape: reason "Bad content"), naming every recipient it was
    not sent to; what the filter found is in the details."""
    email = ev.EmailEvent(
        event_type=ev.EMAIL_EVENT_TYPE_REJECT,
        reject=ev.Reject(reason="Bad content", details=details, filter=filter_name),
    )
    email.mail.CopyFrom(mail_object(queued))
    del email.mail.destination[:]
    email.mail.destination.extend(recipients)
    email.filtration.CopyFrom(queued.filtration)
    event = new_event(queued.account_id, time=now, email=email)
    # A message is rejected at most once: a worker that dies after publishing and rejects it again
    # on redelivery publishes the same event id, which JetStream and the statistics count once.
    event.event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"postmesh:reject:{queued.message_id}").hex
    return event


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
    # Waits between scans while a content scanner is unreachable (attempts counted apart).
    scan_policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(base_minutes=0.5, max_minutes=10.0))


class HeldMessages(Protocol):
    """Where messages held by the spam policy wait for an operator (services.sender.filtration.held)."""

    async def hold(self, queued: queue_pb2.QueuedMessage, mime: bytes, details: str) -> None: ...

    async def count(self) -> int: ...


def _queued_by_accept(queued: queue_pb2.QueuedMessage) -> bool:
    """A copy the accept path queued (a SendEmail retry may have queued it twice), not one the
    delivery workers queued again themselves (a retry, a scan deferred, an operator's release)."""
    return queued.attempt == 0 and queued.scan_attempt == 0 and not queued.released


def _outcome_label(email: ev.EmailEvent) -> str:
    if email.event_type == ev.EMAIL_EVENT_TYPE_DELIVERY:
        return "delivered"
    if email.event_type == ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY:
        return "delayed"
    if email.event_type == ev.EMAIL_EVENT_TYPE_BOUNCE:
        return (
            "bounced_permanent"
            if email.bounce.bounce_type == ev.BOUNCE_TYPE_PERMANENT
            else "bounced_transient"
        )
    return ev.EmailEventType.Name(email.event_type).removeprefix("EMAIL_EVENT_TYPE_").lower()


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class Undeliverable(Exception):
    """The message can never go out, whatever the next attempt: its body is gone, or it cannot be
    signed. It ends with a Reject event (as SES reports mail it accepted but will not send), instead
    of being retried until it expires; no recipient is blamed (no bounce, no suppression)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# dkimpy's verdicts on the message itself (its header block, its size): the same on every attempt.
# A key that cannot be used (KeyFormatError) is not among them: the identity's keys may be fixed.
_UNSIGNABLE = (dkim.MessageFormatError, dkim.ParameterError, ValueError, IndexError, UnicodeError)


class _Heartbeat:
    """Reports a delivery in progress every `interval` seconds until stopped, as a task sleeping and
    calling msg.in_progress() in turn would (the next report once the last is done, none after one
    fails), on a timer: no task per message."""

    def __init__(self, msg: Msg, interval: float) -> None:
        self._msg = msg
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self._report: asyncio.Task[None] | None = None
        self._stopped = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(interval, self._send)

    def _send(self) -> None:
        self._timer = None
        self._report = self._loop.create_task(self._msg.in_progress())
        self._report.add_done_callback(self._sent)

    def _sent(self, report: asyncio.Task[None]) -> None:
        self._report = None
        if self._stopped or report.cancelled():
            return
        if report.exception() is not None:
            log.debug("delivery progress not reported", exc_info=report.exception())
            return
        self._timer = self._loop.call_later(self._interval, self._send)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._report is not None:
            self._report.cancel()


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
        tracking: MessageTracking | None = None,
        simulator: MailboxSimulator | None = None,
        filters: ContentFilters | None = None,
        held: HeldMessages | None = None,
    ) -> None:
        self.js = js
        self.tracking = tracking
        self.filters = filters
        self.held = held
        self.events = events
        self.signing = signing
        self.transport = transport
        self.config = config
        self.clock = clock
        self.simulator = simulator or MailboxSimulator("")
        self._inflight: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._ledger: KeyValue | None = None
        self._attempted: collections.OrderedDict[int, dict[str, Outcome]] = collections.OrderedDict()

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
        sub = await Puller.bind(self.js, stream=OUTBOUND.name, durable=DURABLE)
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
        not_before = protoutil.from_timestamp(queued.not_before)
        now = self.clock.now()
        if not_before is not None and not_before > now:
            await msg.nak(delay=(not_before - now).total_seconds())
            return
        if _queued_by_accept(queued) and not queued.queued_once:
            try:
                if self._ledger is None:
                    self._ledger = await queued_ledger(self.js)
                first = await first_copy(self._ledger, queued.message_id, msg.metadata.sequence.stream)
            except Exception:
                log.warning("queued-copy ledger unreachable; retrying later", extra={"id": queued.message_id})
                await msg.nak(delay=min(self.config.ack_wait_seconds, 5.0))
                return
            if not first:
                # A SendEmail retry queued this message again after its first copy was taken.
                log.warning("second queued copy of a message dropped", extra={"id": queued.message_id})
                await msg.ack()
                return
        sequence = msg.metadata.sequence.stream
        heartbeat = _Heartbeat(msg, self.config.ack_wait_seconds / 3)
        try:
            with tracing.span(
                "deliver",
                kind=SpanKind.CONSUMER,
                parent_carrier=msg.headers or {},
                attributes={
                    "messaging.system": "nats",
                    "messaging.message.id": queued.message_id,
                    "postmesh.attempt": queued.attempt,
                    "postmesh.recipients": len(queued.recipients),
                },
            ):
                await self.deliver(
                    queued,
                    attempted=self._attempted.get(sequence),
                    on_attempted=lambda outcomes: self._remember(sequence, outcomes),
                )
        except SigningUnavailable as unavailable:
            # A local dependency, not the recipient's server: the message waits for it, and its retry
            # schedule (minutes apart) is kept for the recipients' own failures.
            log.warning(
                "DKIM keys unavailable; the message waits for them",
                extra={"id": queued.message_id, "error": str(unavailable)},
            )
            DKIM_SIGNING_FAILURES.labels("keys_unavailable").inc()
            heartbeat.stop()
            await msg.nak(delay=min(self.config.ack_wait_seconds, _SIGNING_KEYS_WAIT_SECONDS))
            return
        except Exception:
            # Unexpected (a bug, or NATS gone): leave it to JetStream to hand out again, a little later.
            log.exception("delivery failed; the message will be redelivered", extra={"id": queued.message_id})
            heartbeat.stop()
            await msg.nak(delay=min(self.config.ack_wait_seconds, 30.0))
            return
        finally:
            heartbeat.stop()
        try:
            await jspublish.ack_sync(msg, wait_seconds=5.0)
        except Exception:
            # NATS went away: the copy comes back, and is then finished without sending it again.
            log.warning("ack not confirmed; kept as attempted", extra={"id": queued.message_id})
            return
        self._attempted.pop(sequence, None)

    def _remember(self, sequence: int, outcomes: dict[str, Outcome]) -> None:
        """SMTP outcomes of a queued copy not yet acked: a copy handed out again after NATS failed
        (events, re-queue or ack) is finished from these, not sent a second time."""
        self._attempted[sequence] = outcomes
        while len(self._attempted) > _ATTEMPTED_MEMORY:
            self._attempted.popitem(last=False)

    # ---- one message ------------------------------------------------------------------------

    def _expire_time(self, queued: queue_pb2.QueuedMessage, now: dt.datetime) -> dt.datetime:
        expire = protoutil.from_timestamp(queued.expire_time)
        if expire is not None:
            return expire
        return (protoutil.from_timestamp(queued.accepted_time) or now) + self.config.policy.max_age

    async def deliver(
        self,
        queued: queue_pb2.QueuedMessage,
        *,
        attempted: dict[str, Outcome] | None = None,
        on_attempted: Callable[[dict[str, Outcome]], None] | None = None,
    ) -> None:
        """One attempt at every remaining recipient; publishes one event per recipient outcome and
        re-queues those to retry. Returns once the message needs nothing more from this worker.
        `attempted`: the outcomes of an attempt already made (only what follows it is done again)."""
        started = self.clock.now()
        expire = self._expire_time(queued, started)
        recipients = list(dict.fromkeys(queued.recipients))
        if started >= expire:
            await self._expire(queued, recipients, "message expired before it could be delivered")
            await forget_mime(self.js, queued)
            return
        simulated = [r for r in recipients if self.simulator.handles(r)]
        to_send = [r for r in recipients if r not in simulated]
        if to_send and not (attempted is not None and set(to_send) <= set(attempted)):
            # The keys before any step with an outcome: without them the message waits, untouched
            # (SigningUnavailable), instead of counting a failed attempt.
            await self._signing_config(queued)
        if simulated:
            await self._simulate(queued, simulated)
            recipients = to_send
            if not recipients:
                await forget_mime(self.js, queued)
                return
        mime: bytes | None = None
        if self.filters is not None and self.filters.pending(queued):
            mime = await self._load(queued)
            if not await self._filter(queued, recipients, mime, expire):
                return
        try:
            if attempted is not None and set(recipients) <= set(attempted):
                # This copy was already attempted by this worker before NATS lost its acknowledgement.
                outcomes = attempted
            else:
                outcomes = await self._attempt(queued, recipients, mime)
                if on_attempted is not None:
                    on_attempted(outcomes)
        except Undeliverable as undeliverable:
            log.warning(
                "undeliverable message rejected",
                extra={"id": queued.message_id, "reason": undeliverable.reason},
            )
            await self._publish_undeliverable(queued, undeliverable.reason, self.clock.now())
            await forget_mime(self.js, queued)
            return
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
                protoutil.set_timestamp(again.not_before, next_time)
                if not again.HasField("expire_time"):
                    protoutil.set_timestamp(again.expire_time, expire)
                await enqueue(self.js, again)
                DELIVERY_RETRIES.inc()
                for recipient in retry:
                    await self._publish_delay(queued, recipient, outcomes[recipient], expire, next_time, now)
                return  # the body is still needed
        await forget_mime(self.js, queued)

    async def _filter(
        self, queued: queue_pb2.QueuedMessage, recipients: list[str], mime: bytes, expire: dt.datetime
    ) -> bool:
        """Scans the message (before it is signed); True when it may go on to delivery. Otherwise it
        has ended here (rejected, held) or been put back to wait for an unreachable scanner."""
        assert self.filters is not None
        verdict = await self.filters.check(queued, mime)
        queued.filtration.CopyFrom(verdict.filtration)
        now = self.clock.now()
        if verdict.kind is ScanKind.PASS:
            return True
        if verdict.kind is ScanKind.DEFER:
            await self._defer_scan(queued, recipients, verdict, expire, now)
            return False
        if verdict.kind is ScanKind.HOLD and self.held is not None:
            await self.held.hold(queued, mime, verdict.details)
        else:
            # A Reject, or a hold by a worker built without a place to keep held mail (the service
            # always gives one): never sending is the safe side of "hold".
            await self._publish_reject(queued, recipients, verdict, now)
        await forget_mime(self.js, queued)
        return False

    async def _defer_scan(
        self,
        queued: queue_pb2.QueuedMessage,
        recipients: list[str],
        verdict: Verdict,
        expire: dt.datetime,
        now: dt.datetime,
    ) -> None:
        """Fail-closed: never sent unscanned. The message goes back on the queue (durable, so a
        restart loses nothing) and waits with its own backoff; each wait is a DeliveryDelay."""
        outcome = Outcome(Kind.TRANSIENT, f"451 4.3.0 {verdict.details}", "4.3.0", delay_type=DELAY_INTERNAL)
        next_time = self.config.scan_policy.next_attempt(queued.scan_attempt, now, expire)
        if next_time is None:
            for recipient in recipients:
                await self._publish_bounce(queued, recipient, outcome, ev.BOUNCE_TYPE_TRANSIENT, now)
            await forget_mime(self.js, queued)
            return
        again = queue_pb2.QueuedMessage()
        again.CopyFrom(queued)
        again.scan_attempt = queued.scan_attempt + 1
        protoutil.set_timestamp(again.not_before, next_time)
        if not again.HasField("expire_time"):
            protoutil.set_timestamp(again.expire_time, expire)
        await enqueue(self.js, again)
        for recipient in recipients:
            await self._publish_delay(queued, recipient, outcome, expire, next_time, now)

    async def _load(self, queued: queue_pb2.QueuedMessage) -> bytes:
        """The message's body; empty when its stored copy has disappeared (then it is undeliverable)."""
        try:
            return await load_mime(self.js, queued)
        except (ObjectNotFoundError, NotFoundError):
            return b""

    async def _signing_config(self, queued: queue_pb2.QueuedMessage) -> SigningConfig:
        return await self.signing.get(
            queued.identity_owner_account_id or queued.account_id, _domain(queued.from_address)
        )

    async def _attempt(
        self, queued: queue_pb2.QueuedMessage, recipients: list[str], mime: bytes | None = None
    ) -> dict[str, Outcome]:
        try:
            config = await self._signing_config(queued)
        except SigningUnavailable as exc:
            DKIM_SIGNING_FAILURES.labels("keys_unavailable").inc()
            failed = Outcome(
                Kind.TRANSIENT, f"451 4.3.0 DKIM keys unavailable: {exc}", "4.3.0", delay_type=DELAY_INTERNAL
            )
            return dict.fromkeys(recipients, failed)
        if mime is None:
            mime = await self._load(queued)
        mime = to_crlf(mime)
        if not mime.strip():
            raise Undeliverable("Message content lost: the stored body of the message no longer exists.")
        if queued.HasField("tracking"):
            mime = await self._track(queued, mime)
        # Signed once per message: a DKIM signature does not depend on the envelope.
        try:
            signed = (
                sign_message(mime, config)
                if len(mime) < 1 << 18
                else await asyncio.to_thread(sign_message, mime, config)
            )
        except _UNSIGNABLE as exc:
            raise Undeliverable(f"Bad content: the message cannot be DKIM-signed ({exc}).") from exc
        require_tls = queued.tls_policy == queue_pb2.TLS_POLICY_REQUIRE
        groups: dict[str, list[str]] = {}
        for recipient in recipients:
            key = _domain(recipient) if self.transport.groups_by_domain else ""
            groups.setdefault(key, []).append(recipient)
        bounce_domain = queued.mail_from_domain or self.config.bounce_domain

        async def one(domain: str, group: list[str]) -> dict[str, Outcome]:
            with tracing.span("smtp", kind=SpanKind.CLIENT, attributes={"postmesh.domain": domain}) as span:
                outcomes = await transaction(domain, group)
                if span is not None:
                    span.set_attribute("postmesh.results", sorted({o.kind.name for o in outcomes.values()}))
                return outcomes

        async def transaction(domain: str, group: list[str]) -> dict[str, Outcome]:
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

        if len(groups) == 1:  # the usual case: no task for gather to wrap the one transaction in
            ((domain, group),) = groups.items()
            results = [await one(domain, group)]
        else:
            results = await asyncio.gather(*(one(domain, group) for domain, group in groups.items()))
        outcomes: dict[str, Outcome] = {}
        for result in results:
            outcomes.update(result)
        return outcomes

    async def _track(self, queued: queue_pb2.QueuedMessage, mime: bytes) -> bytes:
        """Tracked links and pixel, before signing; untracked when this replica has no secret."""
        if self.tracking is None:
            log.warning("tracking asked for but TRACKING_SECRET is empty", extra={"id": queued.message_id})
            return mime
        return await self.tracking.apply(queued, mime, self._mail(queued))

    async def _simulate(self, queued: queue_pb2.QueuedMessage, recipients: list[str]) -> None:
        """The mailbox simulator's answer for its addresses: their events, without any SMTP."""
        for recipient in recipients:
            simulation = self.simulator.simulation(recipient)
            now = self.clock.now()
            if simulation.delivered:
                outcome = Outcome(Kind.DELIVERED, "250 2.0.0 Ok: delivered by the mailbox simulator", "2.0.0")
                await self._publish_delivery(queued, recipient, outcome, now, simulated=True)
            if simulation.bounce is not None:
                await self._publish_simulated_bounce(queued, recipient, simulation.bounce, self.clock.now())
            if simulation.complaint:
                await self._publish_simulated_complaint(queued, recipient, self.clock.now())

    async def _expire(self, queued: queue_pb2.QueuedMessage, recipients: list[str], why: str) -> None:
        now = self.clock.now()
        outcome = Outcome(Kind.TRANSIENT, f"451 4.4.7 {why}", "4.4.7")
        for recipient in recipients:
            await self._publish_bounce(queued, recipient, outcome, ev.BOUNCE_TYPE_TRANSIENT, now)

    # ---- events ------------------------------------------------------------------------------

    def _mail(self, queued: queue_pb2.QueuedMessage) -> ev.Mail:
        return mail_object(queued)

    async def _publish(
        self,
        queued: queue_pb2.QueuedMessage,
        email: ev.EmailEvent,
        now: dt.datetime,
        *,
        simulated: bool = False,
    ) -> None:
        DELIVERY_OUTCOMES.labels(_outcome_label(email)).inc()
        email.mail.CopyFrom(self._mail(queued))
        email.simulated = simulated
        if queued.HasField("filtration"):
            email.filtration.CopyFrom(queued.filtration)
        await self.events.publish(new_event(queued.account_id, time=now, email=email))

    async def _publish_delivery(
        self,
        queued: queue_pb2.QueuedMessage,
        recipient: str,
        outcome: Outcome,
        now: dt.datetime,
        *,
        simulated: bool = False,
    ) -> None:
        accepted = protoutil.from_timestamp(queued.accepted_time) or now
        delivery = ev.Delivery(
            timestamp=protoutil.timestamp(now),
            processing_time_millis=max(0, int((now - accepted).total_seconds() * 1000)),
            recipients=[recipient],
            smtp_response=outcome.response,
            reporting_mta=self.config.reporting_mta,
            remote_mta_ip=outcome.remote_ip,
        )
        await self._publish(
            queued,
            ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_DELIVERY, delivery=delivery),
            now,
            simulated=simulated,
        )

    async def _publish_simulated_bounce(
        self, queued: queue_pb2.QueuedMessage, recipient: str, simulated: SimulatedBounce, now: dt.datetime
    ) -> None:
        bounce = ev.Bounce(
            bounce_type=simulated.bounce_type,
            bounce_sub_type=simulated.sub_type,
            bounced_recipients=[
                ev.BouncedRecipient(
                    email_address=recipient,
                    action="failed",
                    status=simulated.status,
                    diagnostic_code=simulated.diagnostic_code,
                )
            ],
            timestamp=protoutil.timestamp(now),
            feedback_id=uuid.uuid4().hex,
            reporting_mta=f"dns; {self.config.reporting_mta}",
        )
        email = ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_BOUNCE, bounce=bounce)
        await self._publish(queued, email, now, simulated=True)

    async def _publish_simulated_complaint(
        self, queued: queue_pb2.QueuedMessage, recipient: str, now: dt.datetime
    ) -> None:
        complaint = ev.Complaint(
            complained_recipients=[ev.ComplainedRecipient(email_address=recipient)],
            timestamp=protoutil.timestamp(now),
            feedback_id=uuid.uuid4().hex,
            complaint_feedback_type="abuse",
            user_agent="postmesh mailbox simulator",
            arrival_date=protoutil.timestamp(now),
        )
        email = ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_COMPLAINT, complaint=complaint)
        await self._publish(queued, email, now, simulated=True)

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
            timestamp=protoutil.timestamp(now),
            feedback_id=uuid.uuid4().hex,
            reporting_mta=f"dns; {self.config.reporting_mta}",
            remote_mta_ip=outcome.remote_ip,
        )
        await self._publish(queued, ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_BOUNCE, bounce=bounce), now)

    async def _publish_undeliverable(
        self, queued: queue_pb2.QueuedMessage, reason: str, now: dt.datetime
    ) -> None:
        reject = ev.Reject(reason=reason)
        await self._publish(queued, ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_REJECT, reject=reject), now)

    async def _publish_reject(
        self, queued: queue_pb2.QueuedMessage, recipients: list[str], verdict: Verdict, now: dt.datetime
    ) -> None:
        log.warning(
            "message rejected as Bad content",
            extra={"id": queued.message_id, "account_id": queued.account_id, "details": verdict.details},
        )
        await self.events.publish(reject_event(queued, recipients, verdict.filter, verdict.details, now))

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
            expiration_time=protoutil.timestamp(expire),
            reporting_mta=f"dns; {self.config.reporting_mta}",
            timestamp=protoutil.timestamp(now),
            attempt=queued.attempt + 1,
            next_attempt_time=protoutil.timestamp(next_time),
        )
        await self._publish(
            queued, ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY, delivery_delay=delay), now
        )
