"""Rejects in the sending statistics, as SES counts them: a rejected message is a Reject, not a
delivery attempt, so it weighs on neither the bounce rate nor its denominator."""

from __future__ import annotations

import datetime as dt

import pytest

from postmesh.cli.main import main
from postmesh.events.v1 import events_pb2 as ev
from postmesh.quota.v1 import quota_pb2 as pb
from postmesh.testing import MeshThread
from tests.conftest import MeshFactory
from tests.quota_helpers import ManualClock, email_event, publish, wait_for

START = dt.datetime(2026, 3, 2, 10, 7, tzinfo=dt.UTC)


def test_a_reject_leaves_the_delivery_attempts_of_its_send(start_mesh: MeshFactory, nats_url: str) -> None:
    clock = ManualClock(START)
    mesh = start_mesh(("identity", "quota"), clock=clock)
    account_id, key = mesh.create_account()
    sent_at = START.replace(minute=10)
    reject = email_event(
        account_id,
        ev.EMAIL_EVENT_TYPE_REJECT,
        sent_at + dt.timedelta(minutes=10),
        recipients=2,
        reject=ev.Reject(reason="Bad content", details="virus: Eicar-Test-Signature", filter="virus"),
    )
    reject.email.mail.timestamp.FromDatetime(sent_at)
    events = [
        email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, sent_at, recipients=2),
        email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, sent_at, recipients=3),
        reject,
    ]
    publish(nats_url, events)
    publish(nats_url, events[2:], again=True)  # a redelivered Reject takes nothing away twice

    def points() -> list[tuple[str, int, int]]:
        with mesh.client(key) as client:
            reply = client.quota.GetSendStatistics(pb.GetSendStatisticsRequest())
        return [
            (p.timestamp.ToDatetime(tzinfo=dt.UTC).strftime("%H:%M"), p.delivery_attempts, p.rejects)
            for p in reply.send_data_points
        ]

    expected = [("10:00", 3, 0), ("10:15", 0, 2)]
    assert wait_for(points, lambda p: p == expected) == expected


def test_postmesh_stats_totals_the_rejects(
    mesh: MeshThread, nats_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    account_id, key = mesh.create_account()
    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", key)
    now = dt.datetime.now(dt.UTC)
    reject = email_event(
        account_id, ev.EMAIL_EVENT_TYPE_REJECT, now, recipients=3, reject=ev.Reject(reason="Bad content")
    )
    publish(nats_url, [email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, now, recipients=5), reject])
    with mesh.client(key) as client:
        wait_for(
            lambda: client.quota.GetSendStatistics(pb.GetSendStatisticsRequest()).send_data_points,
            lambda points: sum(p.rejects for p in points) == 3,
        )
    assert main(["stats", "--hours", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 message(s) rejected as Bad content (virus or spam) in the last 2h" in out


def _hold(account_id: str, action: int, at: dt.datetime, recipients: int, message_id: str) -> ev.Event:
    event = email_event(
        account_id,
        ev.EMAIL_EVENT_TYPE_HOLD,
        at,
        recipients=recipients,
        hold=ev.Hold(action=action),  # type: ignore[arg-type]
    )
    event.email.mail.message_id = message_id
    return event


def test_held_released_and_dropped_messages_are_counted_apart(
    mesh: MeshThread, nats_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    account_id, key = mesh.create_account()
    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", key)
    now = dt.datetime.now(dt.UTC)
    events = [
        email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, now, recipients=5),
        _hold(account_id, ev.HOLD_ACTION_HELD, now, 2, "m-1"),
        _hold(account_id, ev.HOLD_ACTION_HELD, now, 1, "m-2"),
        _hold(account_id, ev.HOLD_ACTION_RELEASED, now, 2, "m-1"),
        _hold(account_id, ev.HOLD_ACTION_DROPPED, now, 1, "m-2"),
        email_event(
            account_id, ev.EMAIL_EVENT_TYPE_REJECT, now, recipients=1, reject=ev.Reject(reason="Bad content")
        ),
    ]
    publish(nats_url, events)
    publish(nats_url, events[1:5], again=True)  # a redelivered Hold event counts once

    def totals() -> tuple[int, ...]:
        with mesh.client(key) as client:
            points = client.quota.GetSendStatistics(pb.GetSendStatisticsRequest()).send_data_points
        return tuple(
            sum(getattr(p, name) for p in points)
            for name in ("delivery_attempts", "rejects", "held", "held_released", "held_dropped")
        )

    # Holding moves no delivery attempt; the drop's Reject takes its one away, as any Reject does.
    expected = (5, 1, 3, 2, 1)
    assert wait_for(totals, lambda t: t == expected) == expected
    assert main(["stats", "--hours", "2"]) == 0
    out = capsys.readouterr().out
    assert "HELD" in out
    assert (
        "3 message(s) held by the spam policy, 2 released and 1 dropped by an operator in the last 2h" in out
    )
