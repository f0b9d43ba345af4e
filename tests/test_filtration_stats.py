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
