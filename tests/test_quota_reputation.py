"""Statistics and reputation fed by email events on NATS: 15-minute data points, idempotent counting,
HEALTHY -> under review -> paused -> reinstated with the notifications, automatic quota increases."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from postmesh.client import Client, error_details
from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.streams import ACCOUNT_CHANGED_SUBJECT, EVENTS, OUTBOUND, event_subject, outbound_subject
from postmesh.events.v1 import events_pb2 as ev
from postmesh.quota.v1 import quota_pb2 as pb
from postmesh.sender.v1 import queue_pb2
from services.quota.notify import SYSTEM_ACCOUNT_ID
from tests.conftest import MeshFactory
from tests.quota_helpers import ManualClock

T = TypeVar("T")
START = dt.datetime(2026, 3, 2, 10, 7, tzinfo=dt.UTC)


def wait_for(probe: Callable[[], T], condition: Callable[[T], bool], timeout: float = 45.0) -> T:
    """Polls `probe` until `condition` holds (events are counted asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if condition(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def email_event(
    account_id: str, kind: int, at: dt.datetime, recipients: int = 1, **payload: object
) -> ev.Event:
    destination = [f"r{i}@example.test" for i in range(recipients)]
    email = ev.EmailEvent(event_type=kind, mail=ev.Mail(destination=destination), **payload)  # type: ignore[arg-type]
    if kind == ev.EMAIL_EVENT_TYPE_BOUNCE and not email.bounce.bounce_type:
        email.bounce.bounce_type = ev.BOUNCE_TYPE_PERMANENT
    if kind == ev.EMAIL_EVENT_TYPE_BOUNCE:
        email.bounce.bounced_recipients.extend(ev.BouncedRecipient(email_address=d) for d in destination)
    if kind == ev.EMAIL_EVENT_TYPE_COMPLAINT:
        email.complaint.complained_recipients.extend(
            ev.ComplainedRecipient(email_address=d) for d in destination
        )
    return new_event(account_id, time=at, email=email)


def publish(nats_url: str, events: list[ev.Event], *, again: bool = False) -> None:
    """Publishes real Event protobufs with EventPublisher; `again` republishes them as a redelivery
    would arrive (same event ids, past the stream's de-duplication)."""

    async def main() -> None:
        connection = await nats.connect(nats_url)
        js = connection.jetstream()
        publisher = EventPublisher(js)
        for event in events:
            if again:
                await js.publish(
                    event_subject(event),
                    event.SerializeToString(),
                    headers={"Nats-Msg-Id": event.event_id + "-again"},
                )
            else:
                await publisher.publish(event)
        await connection.close()

    asyncio.run(main())


def account_changed_events(nats_url: str, account_id: str) -> list[ev.AccountChanged]:
    async def main() -> list[ev.AccountChanged]:
        connection = await nats.connect(nats_url)
        js = connection.jetstream()
        subscription = await js.pull_subscribe(
            ACCOUNT_CHANGED_SUBJECT,
            stream=EVENTS.name,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=5),
        )
        found = []
        while True:
            try:
                messages = await subscription.fetch(256, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            for message in messages:
                event = ev.Event.FromString(message.data)
                if event.account_id == account_id:
                    found.append(event.account_changed)
                await message.ack()
        await connection.close()
        return found

    return asyncio.run(main())


def last_notification(nats_url: str) -> queue_pb2.QueuedMessage:
    async def main() -> queue_pb2.QueuedMessage:
        connection = await nats.connect(nats_url)
        message = await connection.jetstream().get_last_msg(
            OUTBOUND.name, outbound_subject(SYSTEM_ACCOUNT_ID)
        )
        await connection.close()
        return queue_pb2.QueuedMessage.FromString(message.data or b"")

    return asyncio.run(main())


def test_send_statistics_in_15_minute_intervals(start_mesh: MeshFactory, nats_url: str) -> None:
    clock = ManualClock(START)
    mesh = start_mesh(("identity", "quota"), clock=clock)
    account_id, key = mesh.create_account()
    at = START.replace(minute=0)
    events = [
        email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, at + dt.timedelta(minutes=7), recipients=3),
        email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, at + dt.timedelta(minutes=14, seconds=59)),
        email_event(account_id, ev.EMAIL_EVENT_TYPE_BOUNCE, at + dt.timedelta(minutes=20)),
        # A soft bounce is not counted, as in SES.
        email_event(
            account_id,
            ev.EMAIL_EVENT_TYPE_BOUNCE,
            at + dt.timedelta(minutes=21),
            bounce=ev.Bounce(bounce_type=ev.BOUNCE_TYPE_TRANSIENT),
        ),
        # Nor is the sender's refusal to send to a suppressed address.
        email_event(
            account_id,
            ev.EMAIL_EVENT_TYPE_BOUNCE,
            at + dt.timedelta(minutes=22),
            bounce=ev.Bounce(
                bounce_type=ev.BOUNCE_TYPE_PERMANENT,
                bounce_sub_type=ev.BOUNCE_SUB_TYPE_ON_ACCOUNT_SUPPRESSION_LIST,
            ),
        ),
        email_event(account_id, ev.EMAIL_EVENT_TYPE_COMPLAINT, at + dt.timedelta(minutes=31)),
        email_event(account_id, ev.EMAIL_EVENT_TYPE_REJECT, at + dt.timedelta(minutes=44, seconds=59)),
        email_event(account_id, ev.EMAIL_EVENT_TYPE_DELIVERY, at + dt.timedelta(minutes=8)),
        # Older than two weeks: stored, but not a data point any more.
        email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, START - dt.timedelta(days=15)),
    ]
    publish(nats_url, events)
    publish(nats_url, events[:3], again=True)  # redelivered: counted once

    def points() -> list[tuple[str, int, int, int, int]]:
        with mesh.client(key) as client:
            reply = client.quota.GetSendStatistics(pb.GetSendStatisticsRequest())
        return [
            (
                p.timestamp.ToDatetime(tzinfo=dt.UTC).strftime("%H:%M"),
                p.delivery_attempts,
                p.bounces,
                p.complaints,
                p.rejects,
            )
            for p in reply.send_data_points
        ]

    expected = [("10:00", 4, 0, 0, 0), ("10:15", 0, 1, 0, 0), ("10:30", 0, 0, 1, 1)]
    assert wait_for(points, lambda p: p == expected) == expected
    # Another account sees none of it.
    _, other_key = mesh.create_account("other")
    with mesh.client(other_key) as other:
        assert not other.quota.GetSendStatistics(pb.GetSendStatisticsRequest()).send_data_points


def test_reputation_review_pause_and_reinstatement(start_mesh: MeshFactory, nats_url: str) -> None:
    clock = ManualClock(START)
    mesh = start_mesh(("identity", "quota"), clock=clock, reputation_min_volume=50)
    account_id, key = mesh.create_account()
    contact = "ops@shop.example.test"

    def account() -> pb.GetAccountResponse:
        with mesh.client(key) as client:
            return client.quota.GetAccount(pb.GetAccountRequest())

    with mesh.client(key) as client:
        client.quota.PutAccountDetails(
            pb.PutAccountDetailsRequest(
                mail_type=pb.MAIL_TYPE_MARKETING,
                website_url="https://shop.example.test",
                additional_contact_email_addresses=[contact],
            )
        )
    # Below the minimum volume nothing is judged, however bad the rate.
    publish(nats_url, [email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, START, recipients=40)])
    publish(nats_url, [email_event(account_id, ev.EMAIL_EVENT_TYPE_BOUNCE, START, recipients=4)])
    state = wait_for(account, lambda a: a.reputation.bounces_in_window == 4)
    assert state.enforcement_status == pb.ENFORCEMENT_STATUS_HEALTHY
    assert state.reputation.bounce_rate == pytest.approx(0.1)

    # 100 messages, 5 bounced: 5% puts the account under review; it may still send.
    publish(nats_url, [email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, START, recipients=60)])
    state = wait_for(account, lambda a: a.reputation.messages_in_window == 100)
    assert state.enforcement_status == pb.ENFORCEMENT_STATUS_HEALTHY  # 4%
    publish(nats_url, [email_event(account_id, ev.EMAIL_EVENT_TYPE_BOUNCE, START)])
    state = wait_for(account, lambda a: a.enforcement_status == pb.ENFORCEMENT_STATUS_PROBATION)
    assert state.enforcement_status == pb.ENFORCEMENT_STATUS_PROBATION
    assert state.sending_enabled and "Bounce rate 5.00%" in state.enforcement_reason
    with Client(mesh.address, mesh.service_key) as service:
        service.quota.ReserveSendQuota(pb.ReserveSendQuotaRequest(account_id=account_id, messages=1))
    mail = last_notification(nats_url)
    assert list(mail.recipients) == [contact] and "under review" in mail.subject

    # One complaint in 100 (1%) passes the 0.5% pause threshold: sending is paused.
    publish(nats_url, [email_event(account_id, ev.EMAIL_EVENT_TYPE_COMPLAINT, START)])
    state = wait_for(account, lambda a: a.enforcement_status == pb.ENFORCEMENT_STATUS_SHUTDOWN)
    assert state.enforcement_status == pb.ENFORCEMENT_STATUS_SHUTDOWN and not state.sending_enabled
    assert "Complaint rate 1.00%" in state.enforcement_reason
    with Client(mesh.address, mesh.service_key) as service, pytest.raises(grpc.RpcError) as excinfo:
        service.quota.ReserveSendQuota(pb.ReserveSendQuotaRequest(account_id=account_id, messages=1))
    details = error_details(excinfo.value)
    assert (details.code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_SENDING_PAUSED")
    mail = last_notification(nats_url)
    assert list(mail.recipients) == [contact] and "paused" in mail.subject
    assert b"Complaint rate 1.00%" in mail.mime

    # Good rates afterwards do not lift a pause: only an operator does.
    clock.advance(minutes=15)
    publish(nats_url, [email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, clock.now(), recipients=900)])
    wait_for(account, lambda a: a.reputation.messages_in_window == 1000)
    assert account().enforcement_status == pb.ENFORCEMENT_STATUS_SHUTDOWN

    with mesh.admin() as admin:
        admin.quota.ReinstateAccountSending(
            pb.ReinstateAccountSendingRequest(account_id=account_id, reason="Customer cleaned the list.")
        )
    state = account()
    assert state.enforcement_status == pb.ENFORCEMENT_STATUS_HEALTHY and state.sending_enabled
    assert state.reputation.messages_in_window == 0  # judged afresh from the reinstatement on
    with Client(mesh.address, mesh.service_key) as service:
        service.quota.ReserveSendQuota(pb.ReserveSendQuotaRequest(account_id=account_id, messages=1))
    assert "healthy" in last_notification(nats_url).subject

    changes = wait_for(lambda: account_changed_events(nats_url, account_id), lambda c: len(c) >= 3)
    assert [(c.enforcement_status, c.sending_enabled) for c in changes] == [
        ("PROBATION", True),
        ("SHUTDOWN", False),
        ("HEALTHY", True),
    ]
    assert changes[-1].reason == "Customer cleaned the list."
    with mesh.client(key) as client:
        history = client.quota.ListAccountChanges(pb.ListAccountChangesRequest()).changes
    assert [(c.enforcement_status, c.actor) for c in history] == [
        (pb.ENFORCEMENT_STATUS_HEALTHY, "operator"),
        (pb.ENFORCEMENT_STATUS_SHUTDOWN, "system"),
        (pb.ENFORCEMENT_STATUS_PROBATION, "system"),
    ]


def test_automatic_quota_increase(start_mesh: MeshFactory, nats_url: str) -> None:
    clock = ManualClock(START)
    mesh = start_mesh(
        ("identity", "quota"),
        clock=clock,
        reputation_min_volume=100,
        quota_auto_increase_interval_seconds=0.2,
        quota_auto_increase_max_send_rate=1500.0,
    )
    account_id, key = mesh.create_account()
    sandbox_id, sandbox_key = mesh.create_account("sandbox")
    with mesh.client(key) as client, mesh.admin() as admin:
        case_id = client.quota.PutAccountDetails(
            pb.PutAccountDetailsRequest(
                mail_type=pb.MAIL_TYPE_TRANSACTIONAL,
                website_url="https://shop.example.test",
                use_case_description="Receipts.",
                production_access_enabled=True,
            )
        ).review_details.case_id
        admin.quota.GrantProductionAccess(
            pb.GrantProductionAccessRequest(case_id=case_id, max_24_hour_send=1000, max_send_rate=1000)
        )
    clock.advance(hours=23)
    with Client(mesh.address, mesh.service_key) as service:
        service.quota.ReserveSendQuota(pb.ReserveSendQuotaRequest(account_id=account_id, messages=850))
        service.quota.ReserveSendQuota(pb.ReserveSendQuotaRequest(account_id=sandbox_id, messages=190))
    publish(
        nats_url,
        [
            email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, clock.now(), recipients=850),
            email_event(sandbox_id, ev.EMAIL_EVENT_TYPE_SEND, clock.now(), recipients=190),
        ],
    )

    def quota_of(api_key: str) -> pb.SendQuota:
        with mesh.client(api_key) as client:
            return client.quota.GetAccount(pb.GetAccountRequest()).send_quota

    # The quota has been in place for 23 hours only: not yet.
    time.sleep(1.0)
    assert quota_of(key).max_24_hour_send == 1000
    clock.advance(hours=1, minutes=1)  # a day since the grant; the 850 are still within 24 hours
    raised = wait_for(lambda: quota_of(key), lambda q: q.max_24_hour_send > 1000)
    assert (raised.max_24_hour_send, raised.max_send_rate) == (2000, 1500)  # the rate at its ceiling
    with mesh.client(key) as client:
        change = client.quota.ListAccountChanges(pb.ListAccountChangesRequest()).changes[0]
    assert change.kind == "QUOTA" and change.actor == "system"
    assert change.reason.startswith("Automatic increase: 850 of 1000")
    # Not again before the new quota has been in use long enough, and never for the sandbox.
    time.sleep(1.0)
    assert quota_of(key).max_24_hour_send == 2000
    assert quota_of(sandbox_key).max_24_hour_send == 200
