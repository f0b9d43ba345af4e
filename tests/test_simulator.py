"""The mailbox simulator through the real mesh (sandbox, delivery workers, events store), and the
statistics of what was never attempted: simulator and suppressed recipients."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from postmesh.common.bus import new_event
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import feedback_pb2 as fpb
from postmesh.quota.v1 import quota_pb2 as qpb
from postmesh.testing_mail import LoopbackDns
from services.quota.statistics import counted
from services.sender.simulator import MailboxSimulator, Scenario
from tests.conftest import MeshFactory
from tests.identity_helpers import create_verified_domain
from tests.quota_helpers import publish
from tests.sending_helpers import own_nats_server, refusal
from tests.test_sending_e2e import _settings, _simple

SIM = "simulator.postmesh.test"
T = TypeVar("T")


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    with own_nats_server(tmp_path / "nats") as url:
        yield url


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


def _wait(get: Callable[[], T], done: Callable[[T], bool], what: str, within: float = 60) -> T:
    deadline = time.monotonic() + within
    while True:
        value = get()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{what}: last saw {value!r}"
        time.sleep(0.2)


def test_simulator_addresses_labels_and_case() -> None:
    simulator = MailboxSimulator("Simulator.Postmesh.Test.")
    assert simulator.handles("success@SIMULATOR.postmesh.test")
    assert not simulator.handles("success@simulator.postmesh.test.evil.example")
    assert not simulator.handles("success@example.test")
    assert simulator.simulation("Bounce+signup-42@" + SIM).bounce is not None
    assert simulator.simulation("success+x@" + SIM).delivered
    ooto = simulator.simulation("ooto@" + SIM)
    assert ooto.delivered and ooto.bounce is not None and ooto.bounce.bounce_type == ev.BOUNCE_TYPE_TRANSIENT
    # An address the simulator does not know does not exist there.
    nobody = simulator.simulation("nobody@" + SIM)
    assert not nobody.delivered and nobody.bounce is not None
    assert nobody.bounce.bounce_type == ev.BOUNCE_TYPE_PERMANENT
    assert {s.value for s in Scenario} == {"success", "bounce", "ooto", "complaint", "suppressionlist"}
    assert not MailboxSimulator("").handles("success@")


def test_send_events_count_only_recipients_really_attempted() -> None:
    mail = ev.Mail(destination=["a@example.test", "B@example.test", "success@" + SIM])
    send = ev.EmailEvent(
        event_type=ev.EMAIL_EVENT_TYPE_SEND,
        mail=mail,
        suppressed_recipients=["b@example.test"],
        simulated_recipients=["success@" + SIM],
    )
    assert counted(new_event("acct", email=send)) == ("delivery_attempts", 1)
    del send.suppressed_recipients[:]
    assert counted(new_event("acct", email=send)) == ("delivery_attempts", 2)
    only_suppressed = ev.EmailEvent(
        event_type=ev.EMAIL_EVENT_TYPE_SEND,
        mail=ev.Mail(destination=["a@example.test"]),
        suppressed_recipients=["a@example.test"],
    )
    assert counted(new_event("acct", email=only_suppressed)) is None
    hard = ev.EmailEvent(
        event_type=ev.EMAIL_EVENT_TYPE_BOUNCE,
        bounce=ev.Bounce(bounce_type=ev.BOUNCE_TYPE_PERMANENT, bounced_recipients=[ev.BouncedRecipient()]),
    )
    assert counted(new_event("acct", email=hard)) == ("bounces", 1)
    hard.simulated = True
    assert counted(new_event("acct", email=hard)) is None


def test_each_simulator_address_gives_its_events_in_the_sandbox(
    start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str
) -> None:
    mesh = start_mesh(**_settings(zone, delivery_workers=2))
    account_id, key = mesh.create_account()
    addresses = [f"{s.value}@{SIM}" for s in Scenario] + [f"success+label@{SIM}"]
    with mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        # A real unverified recipient is still refused in the sandbox.
        code, reason, _, _ = refusal(
            lambda: client.sender.SendEmail(_simple("me@example.test", ["someone@elsewhere.example"]))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "MESSAGE_REJECTED"
        message_id = client.sender.SendEmail(_simple("me@example.test", addresses)).message_id

        def insights() -> list[ev.Event]:
            try:
                request = fpb.GetMessageInsightsRequest(message_id=message_id)
                return list(client.feedback.GetMessageInsights(request).events)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                return []

        # Send, 4 deliveries (success, success+label, ooto, complaint), 3 bounces, 1 complaint.
        events = _wait(insights, lambda e: len(e) >= 9, "simulator events", within=60)
        outcomes: set[tuple[object, ...]] = set()
        for event in events[1:]:
            email = event.email
            assert email.simulated
            if email.event_type == ev.EMAIL_EVENT_TYPE_DELIVERY:
                outcomes.add(("delivery", email.delivery.recipients[0]))
            elif email.event_type == ev.EMAIL_EVENT_TYPE_BOUNCE:
                recipient = email.bounce.bounced_recipients[0]
                kind = (email.bounce.bounce_type, email.bounce.bounce_sub_type)
                outcomes.add(("bounce", recipient.email_address, *kind))
                if recipient.email_address.startswith("bounce@"):
                    assert (
                        recipient.status == "5.1.1" and "550 5.1.1 user unknown" in recipient.diagnostic_code
                    )
            else:
                assert email.event_type == ev.EMAIL_EVENT_TYPE_COMPLAINT
                assert email.complaint.complaint_feedback_type == "abuse"
                outcomes.add(("complaint", email.complaint.complained_recipients[0].email_address))
        assert events[0].email.event_type == ev.EMAIL_EVENT_TYPE_SEND
        assert sorted(events[0].email.simulated_recipients) == sorted(addresses)
        assert outcomes == {
            ("delivery", f"success@{SIM}"),
            ("delivery", f"success+label@{SIM}"),
            ("delivery", f"ooto@{SIM}"),
            ("delivery", f"complaint@{SIM}"),
            ("bounce", f"bounce@{SIM}", ev.BOUNCE_TYPE_PERMANENT, ev.BOUNCE_SUB_TYPE_GENERAL),
            ("bounce", f"ooto@{SIM}", ev.BOUNCE_TYPE_TRANSIENT, ev.BOUNCE_SUB_TYPE_GENERAL),
            (
                "bounce",
                f"suppressionlist@{SIM}",
                ev.BOUNCE_TYPE_PERMANENT,
                ev.BOUNCE_SUB_TYPE_ON_ACCOUNT_SUPPRESSION_LIST,
            ),
            ("complaint", f"complaint@{SIM}"),
        }

        # A real hard bounce published after them: once it is suppressed and counted, the simulated
        # ones before it in the stream were seen, and neither suppressed nor counted.
        real = new_event(
            account_id,
            email=ev.EmailEvent(
                event_type=ev.EMAIL_EVENT_TYPE_BOUNCE,
                mail=ev.Mail(message_id="real", destination=["gone@example.test"]),
                bounce=ev.Bounce(
                    bounce_type=ev.BOUNCE_TYPE_PERMANENT,
                    bounced_recipients=[ev.BouncedRecipient(email_address="gone@example.test")],
                ),
            ),
        )
        publish(nats_url, [real])

        def suppressed() -> list[str]:
            reply = client.feedback.ListSuppressedDestinations(fpb.ListSuppressedDestinationsRequest())
            return [s.email_address for s in reply.suppressed_destination_summaries]

        assert _wait(suppressed, lambda s: bool(s), "the real bounce suppressed") == ["gone@example.test"]

        def totals() -> tuple[int, int, int]:
            points = client.quota.GetSendStatistics(qpb.GetSendStatisticsRequest()).send_data_points
            return (
                sum(p.delivery_attempts for p in points),
                sum(p.bounces for p in points),
                sum(p.complaints for p in points),
            )

        assert _wait(totals, lambda t: t[1] == 1, "the real bounce counted") == (0, 1, 0)
        # The simulator counts against the quota all the same.
        quota = client.quota.GetAccount(qpb.GetAccountRequest()).send_quota
        assert quota.sent_last_24_hours == len(addresses)


def test_suppressed_recipients_are_no_delivery_attempts(
    start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str
) -> None:
    mesh = start_mesh(**_settings(zone, delivery_workers=0))
    _, key = mesh.create_account()
    with mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        for address in ("x1@example.test", "x2@example.test"):
            client.feedback.PutSuppressedDestination(
                fpb.PutSuppressedDestinationRequest(
                    email_address=address, reason=fpb.SUPPRESSION_LIST_REASON_BOUNCE
                )
            )
        recipients = ["x1@example.test", "X2@example.test", "ok@example.test"]
        message_id = client.sender.SendEmail(_simple("me@example.test", recipients)).message_id

        def points() -> list[qpb.SendDataPoint]:
            return list(client.quota.GetSendStatistics(qpb.GetSendStatisticsRequest()).send_data_points)

        counted_points = _wait(points, lambda p: bool(p), "the send counted")
        assert [(p.delivery_attempts, p.bounces) for p in counted_points] == [(1, 0)]
        # Only the attempted recipient used quota; the two suppressed ones each have their bounce.
        assert client.quota.GetAccount(qpb.GetAccountRequest()).send_quota.sent_last_24_hours == 1
        request = fpb.ListEmailEventsRequest(message_id=message_id, event_types=[ev.EMAIL_EVENT_TYPE_BOUNCE])
        bounces = _wait(
            lambda: list(client.feedback.ListEmailEvents(request).events), lambda e: len(e) == 2, "bounces"
        )
        assert {e.email.bounce.bounce_sub_type for e in bounces} == {
            ev.BOUNCE_SUB_TYPE_ON_ACCOUNT_SUPPRESSION_LIST
        }
