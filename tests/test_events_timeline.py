"""The events store: every email event kept per account, a message's timeline, filtered listings, on
SQLite and PostgreSQL; and GetMessageInsights / ListEmailEvents / `postmesh events` on a real mesh."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from postmesh.cli.main import main
from postmesh.common import db
from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.errors import InvalidArgument, NotFound
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import feedback_pb2 as pb
from postmesh.testing import MeshThread
from services.feedback.models import Base
from services.feedback.timeline.store import EventFilter, EventStore

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


class StepClock:
    def __init__(self) -> None:
        self.value = T0 + dt.timedelta(hours=1)

    def now(self) -> dt.datetime:
        return self.value


def _mail(message_id: str, *recipients: str) -> ev.Mail:
    return ev.Mail(
        message_id=message_id, source="me@example.test", destination=list(recipients), subject="Hi"
    )


def send(account_id: str, message_id: str, *recipients: str, at: dt.datetime = T0) -> ev.Event:
    return new_event(
        account_id,
        time=at,
        email=ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_SEND, mail=_mail(message_id, *recipients)),
    )


def delivery(account_id: str, message_id: str, recipient: str, at: dt.datetime) -> ev.Event:
    return new_event(
        account_id,
        time=at,
        email=ev.EmailEvent(
            event_type=ev.EMAIL_EVENT_TYPE_DELIVERY,
            mail=_mail(message_id, recipient),
            delivery=ev.Delivery(recipients=[recipient], smtp_response="250 2.0.0 Ok"),
        ),
    )


def bounce(account_id: str, message_id: str, recipient: str, at: dt.datetime) -> ev.Event:
    return new_event(
        account_id,
        time=at,
        email=ev.EmailEvent(
            event_type=ev.EMAIL_EVENT_TYPE_BOUNCE,
            mail=_mail(message_id, recipient),
            bounce=ev.Bounce(
                bounce_type=ev.BOUNCE_TYPE_PERMANENT,
                bounce_sub_type=ev.BOUNCE_SUB_TYPE_GENERAL,
                bounced_recipients=[
                    ev.BouncedRecipient(email_address=recipient, status="5.1.1", diagnostic_code="smtp; 550")
                ],
            ),
        ),
    )


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[tuple[EventStore, StepClock]]:
    engine = db.create_engine(database_url)
    migrations = Path(__file__).parent.parent / "services" / "feedback" / "migrations"
    await db.migrate(engine, migrations, "alembic_version_feedback", Base.metadata)
    clock = StepClock()
    yield EventStore(db.session_factory(engine), clock), clock
    await engine.dispose()


async def test_store_keeps_each_event_once_and_answers_per_account(
    store: tuple[EventStore, StepClock],
) -> None:
    events, _ = store
    minute = dt.timedelta(minutes=1)
    sent = send("acct-a", "m1", "a@example.test", "B@Example.test", at=T0)
    later = [
        delivery("acct-a", "m1", "a@example.test", T0 + 2 * minute),
        bounce("acct-a", "m1", "B@Example.test", T0 + minute),
    ]
    # Another account's event about a message id of the same name stays its own.
    foreign = delivery("acct-b", "m1", "a@example.test", T0 + 3 * minute)
    assert await events.record([sent, *later, foreign]) == 4
    assert await events.record([sent, later[0]]) == 0  # redelivered: nothing stored twice
    assert (
        await events.record(
            [new_event("", email=ev.EmailEvent()), new_event("acct-a", api_key_revoked=ev.ApiKeyRevoked())]
        )
        == 0
    )

    timeline = await events.timeline("acct-a", "m1")
    assert [e.event_id for e in timeline.events] == [sent.event_id, later[1].event_id, later[0].event_id]
    assert timeline.mail.destination == ["a@example.test", "B@Example.test"]
    assert [e.event_id for e in (await events.timeline("acct-b", "m1")).events] == [foreign.event_id]
    with pytest.raises(NotFound):
        await events.timeline("acct-c", "m1")
    with pytest.raises(InvalidArgument):
        await events.timeline("acct-a", "")

    newest_first, token = await events.list("acct-a", EventFilter(), 0, "")
    assert [e.event_id for e in newest_first] == [
        later[0].event_id,
        later[1].event_id,
        sent.event_id,
    ] and not token
    bounces, _ = await events.list("acct-a", EventFilter(event_types=[ev.EMAIL_EVENT_TYPE_BOUNCE]), 0, "")
    assert [e.event_id for e in bounces] == [later[1].event_id]
    # Recipients compare case-insensitively; the Send event names every recipient.
    about_b, _ = await events.list("acct-a", EventFilter(recipient="b@example.TEST"), 0, "")
    assert [e.event_id for e in about_b] == [later[1].event_id, sent.event_id]
    window, _ = await events.list("acct-a", EventFilter(start=T0 + minute, end=T0 + 2 * minute), 0, "")
    assert [e.event_id for e in window] == [later[1].event_id]
    assert (await events.list("acct-a", EventFilter(message_id="other"), 0, ""))[0] == []
    with pytest.raises(InvalidArgument):
        await events.list("acct-a", EventFilter(recipient="not an address"), 0, "")
    with pytest.raises(InvalidArgument):
        await events.list("acct-a", EventFilter(event_types=[ev.EMAIL_EVENT_TYPE_UNSPECIFIED]), 0, "")
    with pytest.raises(InvalidArgument):
        await events.list("acct-a", EventFilter(), 0, "bm90IGEgdG9rZW4")


async def test_store_pages_newest_first_and_expires_past_retention(
    store: tuple[EventStore, StepClock],
) -> None:
    events, clock = store
    # Several events in the same second: the page token must still neither skip nor repeat one.
    batch = [
        send("acct-a", f"m{i}", "x@example.test", at=T0 + dt.timedelta(seconds=i // 3)) for i in range(10)
    ]
    await events.record(batch)
    seen: list[str] = []
    token = ""
    while True:
        page, token = await events.list("acct-a", EventFilter(), 4, token)
        assert len(page) <= 4
        seen += [e.event_id for e in page]
        if not token:
            break
    expected = [
        e.event_id for e in sorted(batch, key=lambda e: (e.time.ToDatetime(), batch.index(e)), reverse=True)
    ]
    assert seen == expected

    clock.value = T0 + dt.timedelta(days=14, seconds=2)
    assert await events.expire(dt.timedelta(days=14)) == 6  # those of seconds 0 and 1
    remaining, _ = await events.list("acct-a", EventFilter(recipient="x@example.test"), 0, "")
    assert len(remaining) == 4


def _publish(mesh: MeshThread, *events: ev.Event) -> None:
    assert mesh.server is not None and mesh.server.nats is not None
    publisher = EventPublisher(mesh.server.nats.jetstream())
    for event in events:
        mesh.run(publisher.publish(event))


def test_insights_and_listing_through_the_mesh_and_cli(
    mesh: MeshThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    account_id, key = mesh.create_account()
    _, other_key = mesh.create_account("other")
    now = dt.datetime.now(dt.UTC)
    sent = send(account_id, "msg-1", "a@example.test", at=now)
    bounced = bounce(account_id, "msg-1", "a@example.test", now + dt.timedelta(seconds=1))
    _publish(mesh, sent, bounced)
    with mesh.client(key) as client, mesh.client(other_key) as other:
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = client.feedback.GetMessageInsights(pb.GetMessageInsightsRequest(message_id="msg-1"))
                if len(reply.events) == 2:
                    break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
            assert time.monotonic() < deadline, "events never reached the store"
            time.sleep(0.2)
        assert [e.email.event_type for e in reply.events] == [
            ev.EMAIL_EVENT_TYPE_SEND,
            ev.EMAIL_EVENT_TYPE_BOUNCE,
        ]
        assert reply.from_email_address == "me@example.test" and reply.subject == "Hi"
        # Another account sees neither the message nor its events.
        with pytest.raises(grpc.RpcError) as excinfo:
            other.feedback.GetMessageInsights(pb.GetMessageInsightsRequest(message_id="msg-1"))
        assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
        assert not other.feedback.ListEmailEvents(pb.ListEmailEventsRequest()).events
        listed = client.feedback.ListEmailEvents(
            pb.ListEmailEventsRequest(event_types=[ev.EMAIL_EVENT_TYPE_BOUNCE], recipient="A@example.test")
        )
        assert [e.event_id for e in listed.events] == [bounced.event_id]
        with pytest.raises(grpc.RpcError) as excinfo:
            client.feedback.ListEmailEvents(pb.ListEmailEventsRequest(page_token="garbage"))
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", key)
    assert main(["events", "--message-id", "msg-1"]) == 0
    out = capsys.readouterr().out
    assert out.index("SEND") < out.index("BOUNCE") and "Permanent/General 5.1.1" in out
    assert main(["events", "--type", "bounce", "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "BOUNCE" in out and "msg-1" in out and "SEND" not in out
    assert main(["events", "--recipient", "a@example.test", "--json"]) == 0
    listed_json = json.loads(capsys.readouterr().out)
    assert {e["event_id"] for e in listed_json["events"]} == {sent.event_id, bounced.event_id}
    monkeypatch.setenv("POSTMESH_API_KEY", other_key)
    assert main(["events", "--message-id", "msg-1"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
