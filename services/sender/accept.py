"""Accepting mail: SendEmail and SendBulkEmail (domain code: no gRPC here).

A message is first composed (every field checked, the final MIME built), then goes through the
pre-send checks, each a small named step, in the order Postal's outgoing message processor reads:

  reserve quota      the account may send (not paused), under its rate and 24-hour quota
  check sender       From (and the feedback address) is a verified identity, or one it may use
  check sandbox      in the sandbox, every recipient is verified
  check suppression  suppressed recipients are dropped, each with a bounce event
  queue              the message is durably on the outbound work queue

A step that refuses gives the whole reservation back; nothing is queued before the last step, and the
caller hears of success only once JetStream has stored the message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from nats.js import JetStreamContext

from postmesh.common.addresses import address_key, domain_of
from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PostmeshError,
    ResourceExhausted,
    Unavailable,
)
from postmesh.common.eventloop import run_to_the_end
from postmesh.common.mailheaders import top_headers
from postmesh.common.outbound import enqueue
from postmesh.common.protoutil import set_timestamp, timestamp
from postmesh.common.sendquota import Reservation
from postmesh.common.service import Clock
from postmesh.events.v1 import events_pb2
from postmesh.sender.v1 import filtration_pb2, queue_pb2, tracking_pb2
from services.sender import rendering
from services.sender.idempotency import Claim, IdempotencyKeys
from services.sender.mime import (
    MAX_MESSAGE_BYTES,
    Addressing,
    Body,
    Header,
    Mailbox,
    build_message,
    check_custom_headers,
    finalize_raw,
    message_id_header,
    new_message_id,
    no_line_breaks,
    parse_mailbox,
    parse_raw,
)
from services.sender.simulator import MailboxSimulator
from services.sender.templates import TemplateStore

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 50
MAX_BULK_ENTRIES = 50
MAX_TAGS = 50
_TAG = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_TAG_VALUE = re.compile(r"^[A-Za-z0-9_.@-]{0,256}$")
_CONFIGURATION_SET = re.compile(r"^[A-Za-z0-9_-]{0,64}$")
# Pauses before publishing an unconfirmed email event again, within the call that accepted it.
_EVENT_RETRY_PAUSES = (0.1, 0.5)
# What a send refused for SEND_MAX_IN_FLIGHT is told to wait before trying again.
_BUSY_RETRY_SECONDS = 1.0
T = TypeVar("T")


# --- What the accept path asks the other services (see services/sender/mesh.py).


@dataclass(frozen=True)
class Authorization:
    identity: str
    owner_account_id: str
    mail_from_domain: str
    # The identity's email feedback forwarding: notices go to the sender when the send names no address.
    feedback_forwarding: bool = False
    # The identity's default configuration set, for a message that names none.
    configuration_set: str = ""


ALL_SUPPRESSION_REASONS = ("BOUNCE", "COMPLAINT")


@dataclass(frozen=True)
class SetOptions:
    """What the accept path needs of a configuration set (the feedback service owns it)."""

    sending_enabled: bool = True
    tls_policy: queue_pb2.TlsPolicy.ValueType = queue_pb2.TLS_POLICY_OPTIONAL
    # SES's MaxDeliverySeconds: retries stop (and the message bounces) this long after accept; 0: the
    # delivery workers' own maximum age.
    max_delivery_seconds: int = 0
    # The suppression reasons that apply to the set's messages (SES: the set's own, or the account's).
    suppressed_reasons: tuple[str, ...] = ALL_SUPPRESSION_REASONS
    # The set's own spam policy (mode UNSPECIFIED: none), judged beside the account's at delivery.
    spam_policy: filtration_pb2.SpamPolicy = field(default_factory=filtration_pb2.SpamPolicy)
    # Open and click tracking, as SES decides it: on when the set has an enabled event destination
    # matching OPEN (the pixel) or CLICK (the links); the set's CustomRedirectDomain for their host.
    track_opens: bool = False
    track_clicks: bool = False
    custom_redirect_domain: str = ""


NO_SET = SetOptions()


class Checks(Protocol):
    async def reserve(self, account_id: str, messages: int) -> Reservation: ...

    async def release(self, reservation: Reservation, messages: int) -> None: ...

    async def authorize_sender(self, account_id: str, address: str, identity: str) -> Authorization: ...

    async def unverified_recipients(self, account_id: str, addresses: list[str]) -> list[str]: ...

    async def suppressed(
        self, account_id: str, addresses: list[str], reasons: Sequence[str] = ALL_SUPPRESSION_REASONS
    ) -> list[str]: ...

    async def configuration_set(self, account_id: str, name: str) -> SetOptions:
        """The set's options; NotFound ("Configuration set <name> does not exist.") when there is none."""
        ...


# --- Requests, as the servicer decodes them.


@dataclass(frozen=True)
class TemplateRef:
    name: str
    data: str
    headers: Sequence[Header] = ()


@dataclass(frozen=True)
class Envelope:
    """What SendEmail and SendBulkEmail share."""

    from_email_address: str
    from_identity: str = ""
    reply_to: Sequence[str] = ()
    feedback_address: str = ""
    feedback_identity: str = ""
    configuration_set: str = ""
    request_id: str = ""
    # sha256 of the whole request, to refuse a request_id reused for another request.
    fingerprint: str = ""


@dataclass(frozen=True)
class Destination:
    to: Sequence[str] = ()
    cc: Sequence[str] = ()
    bcc: Sequence[str] = ()

    def __bool__(self) -> bool:
        return bool(self.to or self.cc or self.bcc)


@dataclass(frozen=True)
class SendRequest:
    envelope: Envelope
    destination: Destination = Destination()
    tags: Sequence[tuple[str, str]] = ()
    simple: Body | None = None
    raw: bytes | None = None
    template: TemplateRef | None = None


@dataclass(frozen=True)
class BulkEntry:
    destination: Destination
    replacement_data: str = ""
    replacement_tags: Sequence[tuple[str, str]] = ()
    replacement_headers: Sequence[Header] = ()


@dataclass(frozen=True)
class BulkRequest:
    envelope: Envelope
    template: TemplateRef
    entries: Sequence[BulkEntry]
    default_tags: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True)
class BulkResult:
    """SES's BulkEmailEntryResult: status is a BulkEmailStatus name (SUCCESS, MESSAGE_REJECTED...)."""

    status: str
    error: str = ""
    message_id: str = ""


def fingerprint(serialized_request: bytes) -> str:
    return hashlib.sha256(serialized_request).hexdigest()


# --- A composed message, ready for the checks.


@dataclass
class Outgoing:
    message_id: str
    sender: Mailbox
    from_identity: str
    to: list[Mailbox]
    cc: list[Mailbox]
    bcc: list[Mailbox]
    subject: str
    mime: bytes
    tags: list[tuple[str, str]]
    configuration_set: str
    feedback: Mailbox | None = None
    feedback_identity: str = ""
    # Extra addresses the account must be allowed to send as (a raw message's header From).
    also_from: list[Mailbox] = field(default_factory=list)

    @functools.cached_property
    def headers(self) -> tuple[list[events_pb2.Header], bool]:
        """The top-level headers events carry (Mail.headers) and whether they were cut short."""
        return top_headers(self.mime)

    @property
    def recipients(self) -> list[str]:
        """Envelope recipients, each once (compared case-insensitively)."""
        seen: dict[str, str] = {}
        for mailbox in [*self.to, *self.cc, *self.bcc]:
            seen.setdefault(address_key(mailbox.address), mailbox.address)
        return list(seen.values())


_EVENT_IDS = uuid.UUID("8f0d3c51-6a43-4b5e-9a57-2f1c0e6b7d11")


_EVENT_ID_PREFIX = _EVENT_IDS.bytes


def _event_id(message_id: str, what: str) -> str:
    """The same event of the same message always has the same id: a send run again for its
    request_id publishes events that JetStream and the consumers (by event id) take once.

    uuid.uuid5(_EVENT_IDS, f"{message_id}:{what}").hex, computed without building the UUID object."""
    digest = bytearray(hashlib.sha1(_EVENT_ID_PREFIX + f"{message_id}:{what}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return digest.hex()


class QueueOutcomeUnknown(Unavailable):
    """JetStream did not confirm a publish: the message may or may not be stored."""


async def _quietly(step: Awaitable[None], what: str) -> None:
    """Settling a claim is best effort once the caller's answer is decided (the lease covers it)."""
    try:
        await asyncio.shield(step)
    except Exception as exc:
        log.warning("could not settle a request_id claim", extra={"step": what, "error": repr(exc)})


class InFlightLimit:
    """At most `limit` messages being accepted at once (0: no limit). Past it a send is refused at
    once with UNAVAILABLE and a retry delay, before it claims anything, instead of waiting behind
    the others: a flood far above what the process accepts meets a clear, retryable refusal rather
    than seconds of queueing and then gRPC's own overload cancellations. One call larger than the
    limit (a bulk send) still goes through when nothing else is in flight."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"SEND_MAX_IN_FLIGHT must be 0 (no limit) or more, not {limit}")
        self.limit = limit
        self.in_flight = 0

    def enter(self, messages: int) -> None:
        if self.limit and self.in_flight and self.in_flight + messages > self.limit:
            raise Unavailable(
                f"This server is accepting {self.in_flight} messages already, its limit "
                f"(SEND_MAX_IN_FLIGHT={self.limit}); retry shortly (a send retried with the same "
                "request_id is never sent twice).",
                reason="SERVER_BUSY",
                retry_after_seconds=_BUSY_RETRY_SECONDS,
            )
        self.in_flight += messages

    def leave(self, messages: int) -> None:
        self.in_flight -= messages


class RenderFailure(Exception):
    def __init__(self, template_name: str, message: str) -> None:
        super().__init__(message)
        self.template_name = template_name
        self.message = message


def _mailboxes(values: Sequence[str], field: str) -> list[Mailbox]:
    return [parse_mailbox(v, field=f"{field}[{i}]") for i, v in enumerate(values)]


def _check_tags(tags: Sequence[tuple[str, str]], field: str) -> list[tuple[str, str]]:
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"At most {MAX_TAGS} tags.", field=field)
    for name, value in tags:
        if not _TAG.match(name) or not _TAG_VALUE.match(value):
            raise InvalidArgument(
                f"Tag {name!r}={value!r}: names and values are letters, digits, '_' and '-', "
                "at most 256 characters.",
                field=field,
            )
    return list(tags)


def _count_recipients(to: Sequence[object], cc: Sequence[object], bcc: Sequence[object], field: str) -> None:
    total = len(to) + len(cc) + len(bcc)
    if total == 0:
        raise InvalidArgument("The message needs at least one recipient.", field=field)
    if total > MAX_RECIPIENTS:
        raise InvalidArgument(
            f"Recipient count exceeds {MAX_RECIPIENTS}: {total} recipients.",
            field=field,
            reason="MESSAGE_REJECTED",
        )


def _check_size(mime: bytes) -> None:
    if len(mime) > MAX_MESSAGE_BYTES:
        raise InvalidArgument(
            f"Message length is more than {MAX_MESSAGE_BYTES} bytes long: {len(mime)}.",
            field="content",
            reason="MESSAGE_REJECTED",
        )


def _template_data(text: str, field: str) -> dict[str, Any]:
    try:
        return rendering.parse_data(text)
    except ValueError as exc:
        raise InvalidArgument(f"The template data is not a JSON object: {exc}.", field=field) from None


# Parsed templates by source: a bulk send renders the same template fifty times.
_parsed = functools.lru_cache(maxsize=512)(rendering.parse)


def _render(template_name: str, parts: tuple[str, str, str], data: dict[str, Any]) -> tuple[str, str, str]:
    """(subject, text, html) rendered; RenderFailure when the data does not fit the template, or the
    three parts together exceed the rendering budget (output size and time)."""
    try:
        subject, text, html = (_parsed(p) for p in parts)
        deadline = time.monotonic() + rendering.MAX_RENDER_SECONDS
        rendered = []
        for template, escape in ((subject, False), (text, False), (html, True)):
            seconds = deadline - time.monotonic()
            if seconds <= 0:
                raise rendering.RenderError(
                    f"Rendering the template took longer than {rendering.MAX_RENDER_SECONDS:g} seconds."
                )
            rendered.append(template.render(data, escape_html=escape, seconds=seconds))
        return rendered[0], rendered[1], rendered[2]
    except (rendering.RenderError, rendering.TemplateSyntaxError) as exc:
        raise RenderFailure(template_name, str(exc)) from None


# Rendering is CPU work: it runs on a small pool of its own, so one heavy template (bounded by its
# budget) slows neither the event loop (other accounts' calls, health checks) nor the default pool.
_RENDER_THREADS = 2


class Acceptor:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        events: EventPublisher,
        checks: Checks,
        templates: TemplateStore,
        keys: IdempotencyKeys,
        clock: Clock,
        message_id_domain: str = "",
        simulator: MailboxSimulator | None = None,
        max_in_flight: int = 0,
    ) -> None:
        self._in_flight = InFlightLimit(max_in_flight)
        self._one_ended = functools.partial(self._in_flight.leave, 1)
        self._js = js
        self._events = events
        self._checks = checks
        self._templates = templates
        self._keys = keys
        self._clock = clock
        self._message_id_domain = message_id_domain
        self._rendering = ThreadPoolExecutor(_RENDER_THREADS, thread_name_prefix="render")
        self._simulator = simulator or MailboxSimulator("")

    def close(self) -> None:
        # A rendering still running ends within its time budget; nothing waits for it.
        self._rendering.shutdown(wait=False, cancel_futures=True)

    async def _render(
        self, template_name: str, parts: tuple[str, str, str], data: dict[str, Any]
    ) -> tuple[str, str, str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._rendering, _render, template_name, parts, data)

    def _new_id(self) -> str:
        return new_message_id(self._clock.now())

    def _message_id_header(self, message_id: str, sender: Mailbox) -> str:
        return message_id_header(message_id, self._message_id_domain or domain_of(sender.address))

    # --- SendEmail

    async def send_email(self, account_id: str, request: SendRequest) -> str:
        self._in_flight.enter(1)
        # To its end even when the caller goes away: the claim on its request_id must be settled for
        # the retry that follows, never left half-done.
        return await run_to_the_end(self._send_email(account_id, request), self._one_ended)

    async def _send_email(self, account_id: str, request: SendRequest) -> str:
        envelope = request.envelope
        if request.simple is None and request.raw is None and request.template is None:
            raise InvalidArgument("The message needs content: simple, raw or template.", field="content")
        claim = await self._keys.claim(account_id, envelope.request_id, envelope.fingerprint, 1, self._new_id)
        if claim.result is not None:
            return str(claim.result["message_id"])

        async def accept() -> dict[str, Any]:
            message = await self._compose(account_id, request, claim.message_ids[0])
            await self._accept(account_id, message, queued_once=not claim.request_id)
            return {"message_id": message.message_id}

        result = await self._claimed(account_id, claim, accept)
        return str(result["message_id"])

    async def _claimed(
        self,
        account_id: str,
        claim: Claim,
        work: Callable[[], Awaitable[Any]],
        final: Callable[[Any], bool] = lambda _result: True,
    ) -> Any:
        """Settles the claim once the call's work ends: finished with the result, given up on a
        refusal (nothing was queued), or released when the outcome is unknown (a retry takes it over
        with the same message ids)."""
        if not claim.request_id:
            # No request_id: nothing was claimed, so there is nothing to settle (every settling step
            # of IdempotencyKeys returns at once), and no task is spent shielding it.
            return await work()
        try:
            result = await work()
        except PostmeshError as error:
            if isinstance(error, QueueOutcomeUnknown):
                await _quietly(self._keys.release(account_id, claim), "release")
            else:
                await _quietly(self._keys.abandon(account_id, claim), "abandon")
            raise
        except BaseException:
            await _quietly(self._keys.release(account_id, claim), "release")
            raise
        if not final(result):
            # Some of it may go through on a retry: the same request_id runs it again, with the same
            # message ids (what was queued is not queued twice).
            await _quietly(self._keys.release(account_id, claim), "release")
            return result
        # The messages are queued: a failure to record the result must not be reported as a failed
        # send. A retry finds the claim unfinished and resolves it with the same ids.
        await _quietly(self._keys.finish(account_id, claim, result), "finish")
        return result

    async def _compose(self, account_id: str, request: SendRequest, message_id: str) -> Outgoing:
        envelope = request.envelope
        _check_configuration_set(envelope.configuration_set)
        tags = _check_tags(request.tags, "email_tags")
        reply_to = _mailboxes(envelope.reply_to, "reply_to_addresses")
        feedback = _feedback(envelope)
        now = self._clock.now()
        if request.raw is not None:
            return self._compose_raw(request, message_id, tags, feedback, now)
        sender = parse_mailbox(envelope.from_email_address, field="from_email_address")
        destination = request.destination
        _count_recipients(destination.to, destination.cc, destination.bcc, "destination")
        to = _mailboxes(destination.to, "destination.to_addresses")
        cc = _mailboxes(destination.cc, "destination.cc_addresses")
        bcc = _mailboxes(destination.bcc, "destination.bcc_addresses")
        if request.template is not None:
            body = await self._render_template(
                account_id, request.template, sender, destination, tags, envelope, message_id
            )
        else:
            assert request.simple is not None
            body = request.simple
            if not body.subject.strip():
                raise InvalidArgument("The message needs a subject.", field="content.simple.subject")
            if not (body.text or body.html):
                raise InvalidArgument("The message needs a text or HTML body.", field="content.simple.body")
            check_custom_headers(body.headers, field="content.simple.headers")
        no_line_breaks(body.subject, field="subject")
        addressing = Addressing(sender, to, cc, reply_to)
        mime = build_message(
            addressing, body, message_id=self._message_id_header(message_id, sender), date=now
        )
        _check_size(mime)
        return Outgoing(
            message_id,
            sender,
            envelope.from_identity,
            to,
            cc,
            bcc,
            body.subject,
            mime,
            tags,
            envelope.configuration_set,
            feedback,
            envelope.feedback_identity,
        )

    def _compose_raw(
        self,
        request: SendRequest,
        message_id: str,
        tags: list[tuple[str, str]],
        feedback: Mailbox | None,
        now: dt.datetime,
    ) -> Outgoing:
        assert request.raw is not None
        envelope = request.envelope
        _check_size(request.raw)
        raw = parse_raw(request.raw)
        tags = tags + _check_tags(raw.tags, "content.raw.data")
        configuration_set = envelope.configuration_set or raw.configuration_set
        _check_configuration_set(configuration_set)
        if envelope.from_email_address:
            sender = parse_mailbox(envelope.from_email_address, field="from_email_address")
        else:
            sender = raw.sender
        # The header From and Sender name who sent it: the account must be allowed to use each (SES
        # checks them as it checks the envelope's From).
        also_from = [
            mailbox
            for mailbox in (raw.sender, raw.sender_header)
            if mailbox is not None and address_key(mailbox.address) != address_key(sender.address)
        ]
        if request.destination:
            destination = request.destination
            _count_recipients(destination.to, destination.cc, destination.bcc, "destination")
            to = _mailboxes(destination.to, "destination.to_addresses")
            cc = _mailboxes(destination.cc, "destination.cc_addresses")
            bcc = _mailboxes(destination.bcc, "destination.bcc_addresses")
        else:
            to, cc, bcc = raw.to, raw.cc, raw.bcc
            _count_recipients(to, cc, bcc, "content.raw.data")
        mime = finalize_raw(request.raw, message_id=self._message_id_header(message_id, sender), date=now)
        _check_size(mime)
        return Outgoing(
            message_id,
            sender,
            envelope.from_identity,
            to,
            cc,
            bcc,
            raw.subject,
            mime,
            tags,
            configuration_set,
            feedback,
            envelope.feedback_identity,
            also_from,
        )

    async def _render_template(
        self,
        account_id: str,
        ref: TemplateRef,
        sender: Mailbox,
        destination: Destination,
        tags: list[tuple[str, str]],
        envelope: Envelope,
        message_id: str,
        *,
        data: dict[str, Any] | None = None,
        field: str = "content.template",
    ) -> Body:
        template = await self._templates.get(account_id, ref.name)
        check_custom_headers(ref.headers, field=f"{field}.headers")
        if data is None:
            data = _template_data(ref.data, f"{field}.template_data")
        try:
            subject, text, html = await self._render(
                ref.name, (template.subject, template.text, template.html), data
            )
        except RenderFailure as failure:
            await self._publish_rendering_failure(
                account_id, failure, message_id, sender, destination, tags, envelope.configuration_set
            )
            raise InvalidArgument(
                f"Rendering failure: {failure.message}",
                field=f"{field}.template_data",
                reason="RENDERING_FAILURE",
            ) from None
        return Body(subject, text, html, headers=ref.headers)

    # --- The checks

    async def _accept(
        self,
        account_id: str,
        message: Outgoing,
        authorization: Authorization | None = None,
        *,
        queued_once: bool,
    ) -> None:
        """Checks, queues and reports one message. `queued_once`: the call has no request_id, so no
        retry can queue this message id again (the delivery worker then needs no first-copy check)."""
        recipients = message.recipients
        options = await self._configuration_set_options(account_id, message.configuration_set)
        reservation = await self._reserve_quota(account_id, len(recipients))
        try:
            # The checks only read, so they run together; the first refusal in this order wins. A
            # check with nothing to ask is left out (a bulk entry's sender, authorized once for the
            # call; the sandbox of an account out of it): no task of its own.
            checks: list[Awaitable[Any]] = []
            if authorization is None:
                checks.append(self._check_sender(account_id, message))
            if not reservation.production_access:
                checks.append(self._check_sandbox(account_id, recipients, reservation))
            checks.append(self._check_suppression(account_id, recipients, options.suppressed_reasons))
            checked = await _together(checks)
            if authorization is None:
                authorization = checked[0]
            suppressed = checked[-1]
            assert authorization is not None and isinstance(suppressed, dict)
            if not message.configuration_set and authorization.configuration_set:
                default = await self._default_set_options(account_id, authorization.configuration_set)
                if default is not None:
                    message = dataclasses.replace(message, configuration_set=authorization.configuration_set)
                    options = default
                    if tuple(options.suppressed_reasons) != ALL_SUPPRESSION_REASONS:
                        suppressed = await self._check_suppression(
                            account_id, recipients, options.suppressed_reasons
                        )
            deliverable = [r for r in recipients if address_key(r) not in suppressed]
            events = self._accepted_events(account_id, message, authorization, sorted(suppressed.values()))
            # The message and its events are stored together, one round trip instead of two; both
            # are confirmed before the reply, so a Send event is never lost (a retry republishes it
            # under the same event id, which JetStream and the consumers take once).
            queueing = (
                [self._queue(account_id, message, authorization, deliverable, options, queued_once)]
                if deliverable
                else []
            )
            first = await asyncio.gather(
                *queueing, *(self._events.publish(e) for e in events), return_exceptions=True
            )
            queued = first[0] if deliverable else None
            published: Exception | None = None
            try:
                await self._publish_confirmed(events, first[len(queueing) :])
            except Exception as exc:
                published = exc
            if isinstance(queued, BaseException):
                raise queued
            if published is not None:
                raise QueueOutcomeUnknown(
                    "The message queue did not confirm the message's events; retry with the same request_id.",
                    reason="QUEUE_UNAVAILABLE",
                    retry_after_seconds=1.0,
                ) from published
        except BaseException:
            await self._release(reservation, reservation.messages)
            raise
        if suppressed:
            await self._release(reservation, len(suppressed))

    async def _configuration_set_options(self, account_id: str, name: str) -> SetOptions:
        if not name:
            return NO_SET
        options = await self._checks.configuration_set(account_id, name)
        if not options.sending_enabled:
            raise FailedPrecondition(
                "Sending is paused for this configuration set.", reason="MESSAGE_REJECTED"
            )
        return options

    async def _default_set_options(self, account_id: str, name: str) -> SetOptions | None:
        """An identity's default set, as an explicit one, except that a set deleted since is ignored."""
        try:
            return await self._configuration_set_options(account_id, name)
        except NotFound:
            return None

    async def _reserve_quota(self, account_id: str, recipients: int) -> Reservation:
        return await self._checks.reserve(account_id, recipients)

    async def _release(self, reservation: Reservation, messages: int) -> None:
        try:
            await asyncio.shield(self._checks.release(reservation, messages))
        except Exception:  # the refusal the caller hears matters more than the refund
            log.exception("could not release send quota", extra={"account": reservation.account_id})

    async def _check_sender(self, account_id: str, message: Outgoing) -> Authorization:
        authorization = await self._checks.authorize_sender(
            account_id, message.sender.address, message.from_identity
        )
        for mailbox in message.also_from:
            await self._checks.authorize_sender(account_id, mailbox.address, message.from_identity)
        if message.feedback is not None:
            await self._checks.authorize_sender(
                account_id, message.feedback.address, message.feedback_identity
            )
        return authorization

    async def _check_sandbox(self, account_id: str, recipients: list[str], reservation: Reservation) -> None:
        if reservation.production_access:
            return
        # The mailbox simulator's addresses are allowed in the sandbox, as in SES.
        real = [r for r in recipients if not self._simulator.handles(r)]
        if not real:
            return
        unverified = await self._checks.unverified_recipients(account_id, real)
        if unverified:
            raise FailedPrecondition(
                "Email address is not verified. The following identities failed the check: "
                + ", ".join(unverified)
                + " (the account is in the sandbox: every recipient must be verified).",
                reason="MESSAGE_REJECTED",
            )

    async def _check_suppression(
        self, account_id: str, recipients: list[str], reasons: Sequence[str]
    ) -> dict[str, str]:
        """The suppressed recipients, by address key (for the reasons that apply to the message)."""
        if not reasons:
            return {}
        suppressed = await self._checks.suppressed(account_id, recipients, reasons)
        keys = {address_key(a) for a in suppressed}
        return {address_key(r): r for r in recipients if address_key(r) in keys}

    async def _queue(
        self,
        account_id: str,
        message: Outgoing,
        authorization: Authorization,
        recipients: list[str],
        options: SetOptions,
        queued_once: bool,
    ) -> None:
        accepted = self._clock.now()
        queued = queue_pb2.QueuedMessage(
            message_id=message.message_id,
            account_id=account_id,
            from_address=message.sender.address,
            from_identity=authorization.identity,
            identity_owner_account_id=authorization.owner_account_id or account_id,
            mail_from_domain=authorization.mail_from_domain,
            recipients=recipients,
            mime=message.mime,
            configuration_set_name=message.configuration_set,
            tags=[events_pb2.EmailTag(name=n, value=v) for n, v in message.tags],
            accepted_time=timestamp(accepted),
            feedback_forwarding_address=_forward_to(message, authorization),
            subject=message.subject,
            headers=message.headers[0],
            headers_truncated=message.headers[1],
            tls_policy=options.tls_policy,
            queued_once=queued_once,
        )
        if options.spam_policy.mode:
            queued.set_spam_policy.CopyFrom(options.spam_policy)
        if options.track_opens or options.track_clicks:
            queued.tracking.CopyFrom(
                tracking_pb2.TrackingOptions(
                    opens=options.track_opens,
                    clicks=options.track_clicks,
                    custom_redirect_domain=options.custom_redirect_domain,
                )
            )
        if options.max_delivery_seconds:
            set_timestamp(queued.expire_time, accepted + dt.timedelta(seconds=options.max_delivery_seconds))
        if not self._queue_connected():
            # Known before anything is sent: the outage is answered at once, and nothing was queued.
            raise Unavailable(
                "The message queue (NATS) is unreachable; try again.",
                reason="QUEUE_UNAVAILABLE",
                retry_after_seconds=1.0,
            )
        try:
            await enqueue(self._js, queued)
        except Exception as exc:
            raise QueueOutcomeUnknown(
                "The message queue did not confirm the message; retry with the same request_id.",
                reason="QUEUE_UNAVAILABLE",
                retry_after_seconds=1.0,
            ) from exc

    def _queue_connected(self) -> bool:
        connection = getattr(self._js, "_nc", None)
        return connection is None or bool(connection.is_connected)

    # --- Events

    def _mail(
        self,
        account_id: str,
        message_id: str,
        sender: Mailbox,
        destination: list[str],
        tags: Sequence[tuple[str, str]],
        configuration_set: str,
        subject: str = "",
        identity: str = "",
    ) -> events_pb2.Mail:
        return events_pb2.Mail(
            timestamp=timestamp(self._clock.now()),
            message_id=message_id,
            source=sender.address,
            sending_account_id=account_id,
            destination=destination,
            tags=[events_pb2.EmailTag(name=n, value=v) for n, v in tags],
            configuration_set_name=configuration_set,
            subject=subject,
            source_identity=identity,
        )

    def _accepted_events(
        self, account_id: str, message: Outgoing, authorization: Authorization, suppressed: list[str]
    ) -> list[events_pb2.Event]:
        """The Send event of an accepted message and a Bounce for each suppressed recipient."""
        mail = self._mail(
            account_id,
            message.message_id,
            message.sender,
            message.recipients,
            message.tags,
            message.configuration_set,
            message.subject,
            authorization.identity,
        )
        headers, truncated = message.headers
        mail.headers.extend(headers)
        mail.headers_truncated = truncated
        mail.feedback_forwarding_address = _forward_to(message, authorization)
        send = events_pb2.EmailEvent(
            event_type=events_pb2.EMAIL_EVENT_TYPE_SEND,
            mail=mail,
            # So statistics count as delivery attempts only the recipients really attempted.
            suppressed_recipients=suppressed,
            simulated_recipients=[r for r in message.recipients if self._simulator.handles(r)],
        )
        events = [new_event(account_id, event_id=_event_id(message.message_id, "send"), email=send)]
        for address in suppressed:
            bounce = events_pb2.Bounce(
                bounce_type=events_pb2.BOUNCE_TYPE_PERMANENT,
                bounce_sub_type=events_pb2.BOUNCE_SUB_TYPE_ON_ACCOUNT_SUPPRESSION_LIST,
                bounced_recipients=[
                    events_pb2.BouncedRecipient(
                        email_address=address,
                        action="failed",
                        status="5.1.1",
                        diagnostic_code="postmesh did not send the message to this address because it "
                        "is on the suppression list for your account.",
                    )
                ],
                timestamp=timestamp(self._clock.now()),
                reporting_mta="postmesh",
            )
            events.append(
                new_event(
                    account_id,
                    event_id=_event_id(message.message_id, f"suppressed:{address_key(address)}"),
                    email=events_pb2.EmailEvent(
                        event_type=events_pb2.EMAIL_EVENT_TYPE_BOUNCE, mail=mail, bounce=bounce
                    ),
                )
            )
        return events

    async def _publish_confirmed(
        self, events: list[events_pb2.Event], results: Sequence[object] | None = None
    ) -> None:
        """Publishes every event, retrying a failed publish a few times; raises if one stays unconfirmed.
        `results`: the outcomes of a first publish of `events` already made (its exceptions, failures)."""
        pending = events
        for pause in (*_EVENT_RETRY_PAUSES, None):
            if results is None:
                results = await asyncio.gather(
                    *(self._events.publish(e) for e in pending), return_exceptions=True
                )
            failed = [(e, r) for e, r in zip(pending, results, strict=True) if isinstance(r, BaseException)]
            if not failed:
                return
            if pause is None:
                raise failed[0][1]
            log.warning(
                "an email event was not confirmed; publishing it again", extra={"error": repr(failed[0][1])}
            )
            await asyncio.sleep(pause)
            pending = [e for e, _ in failed]
            results = None

    async def _publish_rendering_failure(
        self,
        account_id: str,
        failure: RenderFailure,
        message_id: str,
        sender: Mailbox,
        destination: Destination,
        tags: Sequence[tuple[str, str]],
        configuration_set: str,
    ) -> None:
        mail = self._mail(
            account_id,
            message_id,
            sender,
            [*destination.to, *destination.cc, *destination.bcc],
            tags,
            configuration_set,
        )
        event = new_event(
            account_id,
            email=events_pb2.EmailEvent(
                event_type=events_pb2.EMAIL_EVENT_TYPE_RENDERING_FAILURE,
                mail=mail,
                rendering_failure=events_pb2.RenderingFailure(
                    template_name=failure.template_name, error_message=failure.message
                ),
            ),
        )
        await self._publish([event])

    async def _publish(self, events: list[events_pb2.Event]) -> None:
        # The message is already queued: an event that cannot be published is logged, not reported
        # as a failed send (the caller would retry and send twice).
        results = await asyncio.gather(*(self._events.publish(e) for e in events), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("could not publish an email event", extra={"error": repr(result)})

    # --- SendBulkEmail

    async def send_bulk(self, account_id: str, request: BulkRequest) -> list[BulkResult]:
        messages = max(1, len(request.entries))
        self._in_flight.enter(messages)
        ended = functools.partial(self._in_flight.leave, messages)
        return await run_to_the_end(self._send_bulk(account_id, request), ended)

    async def _send_bulk(self, account_id: str, request: BulkRequest) -> list[BulkResult]:
        envelope = request.envelope
        if not request.entries:
            raise InvalidArgument("At least one bulk email entry is needed.", field="bulk_email_entries")
        if len(request.entries) > MAX_BULK_ENTRIES:
            raise InvalidArgument(
                f"At most {MAX_BULK_ENTRIES} bulk email entries per call.", field="bulk_email_entries"
            )
        _check_configuration_set(envelope.configuration_set)
        sender = parse_mailbox(envelope.from_email_address, field="from_email_address")
        reply_to = _mailboxes(envelope.reply_to, "reply_to_addresses")
        feedback = _feedback(envelope)
        default_tags = _check_tags(request.default_tags, "default_email_tags")
        field = "default_content.template"
        template = await self._templates.get(account_id, request.template.name)
        check_custom_headers(request.template.headers, field=f"{field}.headers")
        default_data = _template_data(request.template.data, f"{field}.template_data")

        claim = await self._keys.claim(
            account_id, envelope.request_id, envelope.fingerprint, len(request.entries), self._new_id
        )
        if claim.result is not None:
            return [BulkResult(**r) for r in claim.result]

        async def accept() -> list[dict[str, str]]:
            probe = Outgoing(
                claim.message_ids[0],
                sender,
                envelope.from_identity,
                [],
                [],
                [],
                "",
                b"",
                [],
                envelope.configuration_set,
                feedback,
                envelope.feedback_identity,
            )
            # The sender is the same for every entry: a refusal refuses the whole call, as in SES.
            authorization = await self._check_sender(account_id, probe)
            results = []
            for index, entry in enumerate(request.entries):
                results.append(
                    await self._bulk_entry(
                        account_id,
                        request,
                        entry,
                        index,
                        claim,
                        template_parts=(template.subject, template.text, template.html),
                        default_data=default_data,
                        default_tags=default_tags,
                        sender=sender,
                        reply_to=reply_to,
                        feedback=feedback,
                        authorization=authorization,
                    )
                )
            return [r.__dict__ for r in results]

        def final(results: list[dict[str, str]]) -> bool:
            return all(r["status"] != "TRANSIENT_FAILURE" for r in results)

        return [BulkResult(**r) for r in await self._claimed(account_id, claim, accept, final)]

    async def _bulk_entry(
        self,
        account_id: str,
        request: BulkRequest,
        entry: BulkEntry,
        index: int,
        claim: Claim,
        *,
        template_parts: tuple[str, str, str],
        default_data: dict[str, Any],
        default_tags: list[tuple[str, str]],
        sender: Mailbox,
        reply_to: list[Mailbox],
        feedback: Mailbox | None,
        authorization: Authorization,
    ) -> BulkResult:
        message_id = claim.message_ids[index]
        field = f"bulk_email_entries[{index}]"
        envelope = request.envelope
        try:
            destination = entry.destination
            _count_recipients(destination.to, destination.cc, destination.bcc, f"{field}.destination")
            to = _mailboxes(destination.to, f"{field}.destination.to_addresses")
            cc = _mailboxes(destination.cc, f"{field}.destination.cc_addresses")
            bcc = _mailboxes(destination.bcc, f"{field}.destination.bcc_addresses")
            tags = dict(default_tags)
            tags.update(_check_tags(entry.replacement_tags, f"{field}.replacement_tags"))
            check_custom_headers(entry.replacement_headers, field=f"{field}.replacement_headers")
            data = {**default_data, **_template_data(entry.replacement_data, f"{field}.replacement_data")}
            try:
                subject, text, html = await self._render(request.template.name, template_parts, data)
            except RenderFailure as failure:
                await self._publish_rendering_failure(
                    account_id,
                    failure,
                    message_id,
                    sender,
                    destination,
                    list(tags.items()),
                    envelope.configuration_set,
                )
                return BulkResult("INVALID_PARAMETER", f"Rendering failure: {failure.message}")
            headers = {h.name.lower(): h for h in request.template.headers}
            headers.update({h.name.lower(): h for h in entry.replacement_headers})
            body = Body(subject, text, html, headers=list(headers.values()))
            no_line_breaks(subject, field="subject")
            mime = build_message(
                Addressing(sender, to, cc, reply_to),
                body,
                message_id=self._message_id_header(message_id, sender),
                date=self._clock.now(),
            )
            _check_size(mime)
            message = Outgoing(
                message_id,
                sender,
                envelope.from_identity,
                to,
                cc,
                bcc,
                subject,
                mime,
                list(tags.items()),
                envelope.configuration_set,
                feedback,
                envelope.feedback_identity,
            )
            await self._accept(account_id, message, authorization, queued_once=not claim.request_id)
        except QueueOutcomeUnknown:
            raise  # the whole call is retried with the same message ids, not this entry alone
        except PostmeshError as error:
            return BulkResult(_bulk_status(error), error.message)
        return BulkResult("SUCCESS", message_id=message_id)

    # --- TestRenderEmailTemplate

    async def test_render(self, account_id: str, name: str, data_text: str) -> tuple[bytes, Body]:
        template = await self._templates.get(account_id, name)
        data = _template_data(data_text, "template_data")
        try:
            subject, text, html = await self._render(
                name, (template.subject, template.text, template.html), data
            )
        except RenderFailure as failure:
            raise InvalidArgument(
                f"Rendering failure: {failure.message}", field="template_data", reason="RENDERING_FAILURE"
            ) from None
        body = Body(subject, text, html)
        no_line_breaks(subject, field="subject")
        return build_message(None, body, message_id=None, date=self._clock.now()), body


async def _together(steps: list[Awaitable[Any]]) -> list[Any]:
    """Runs the steps concurrently (one alone is simply awaited, no task) and returns their results in
    order once all have ended; raises the first step's exception in that order, if any."""
    if len(steps) == 1:
        return [await steps[0]]
    outcomes = await asyncio.gather(*steps, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


def _feedback(envelope: Envelope) -> Mailbox | None:
    if not envelope.feedback_address:
        return None
    return parse_mailbox(envelope.feedback_address, field="feedback_forwarding_email_address")


def _forward_to(message: Outgoing, authorization: Authorization) -> str:
    """Where bounce and complaint notices about the message go (SES): the send's
    FeedbackForwardingEmailAddress, else the sender when its identity forwards feedback, else nowhere."""
    if message.feedback is not None:
        return message.feedback.address
    return message.sender.address if authorization.feedback_forwarding else ""


def _check_configuration_set(name: str) -> None:
    if not _CONFIGURATION_SET.match(name):
        raise InvalidArgument(
            "configuration_set_name must be at most 64 letters, digits, '_' or '-'.",
            field="configuration_set_name",
        )


def _bulk_status(error: PostmeshError) -> str:
    if isinstance(error, InvalidArgument):
        return "MESSAGE_REJECTED" if error.reason == "MESSAGE_REJECTED" else "INVALID_PARAMETER"
    if isinstance(error, ResourceExhausted):
        text = f"{error.reason} {error.message}".lower()
        return "ACCOUNT_DAILY_QUOTA_EXCEEDED" if "daily" in text else "ACCOUNT_THROTTLED"
    if isinstance(error, Unavailable):
        return "TRANSIENT_FAILURE"
    if error.reason in ("MESSAGE_REJECTED", "MAIL_FROM_DOMAIN_NOT_VERIFIED", "ACCOUNT_SENDING_PAUSED"):
        return error.reason
    return "FAILED"
