"""The account suppression list: the API, and what bounce and complaint events add to it."""

from __future__ import annotations

import time

import grpc
import pytest

from postmesh.common.bus import EventPublisher, new_event
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import feedback_pb2 as pb
from postmesh.testing import MeshThread


def _publish(mesh: MeshThread, event: ev.Event) -> None:
    assert mesh.server is not None and mesh.server.nats is not None
    publisher = EventPublisher(mesh.server.nats.jetstream())
    mesh.run(publisher.publish(event))


def _bounce(
    account_id: str, address: str, bounce_type: int, sub_type: int = ev.BOUNCE_SUB_TYPE_GENERAL
) -> ev.Event:
    return new_event(
        account_id,
        email=ev.EmailEvent(
            event_type=ev.EMAIL_EVENT_TYPE_BOUNCE,
            mail=ev.Mail(message_id="m-" + address),
            bounce=ev.Bounce(
                bounce_type=bounce_type,  # type: ignore[arg-type]
                bounce_sub_type=sub_type,  # type: ignore[arg-type]
                bounced_recipients=[ev.BouncedRecipient(email_address=address, status="5.1.1")],
                feedback_id="fb-" + address,
            ),
        ),
    )


def _complaint(account_id: str, address: str, feedback_type: str = "abuse") -> ev.Event:
    return new_event(
        account_id,
        email=ev.EmailEvent(
            event_type=ev.EMAIL_EVENT_TYPE_COMPLAINT,
            mail=ev.Mail(message_id="m-" + address),
            complaint=ev.Complaint(
                complained_recipients=[ev.ComplainedRecipient(email_address=address)],
                complaint_feedback_type=feedback_type,
            ),
        ),
    )


def _suppressed(client, address: str) -> pb.SuppressedDestination | None:  # type: ignore[no-untyped-def]
    try:
        reply = client.feedback.GetSuppressedDestination(
            pb.GetSuppressedDestinationRequest(email_address=address)
        )
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return None
    return reply.suppressed_destination


def test_hard_bounces_and_complaints_are_suppressed_soft_ones_not(mesh: MeshThread) -> None:
    account_id, key = mesh.create_account()
    other_id, other_key = mesh.create_account("other")
    _publish(mesh, _bounce(account_id, "soft@example.test", ev.BOUNCE_TYPE_TRANSIENT))
    _publish(mesh, _complaint(account_id, "happy@example.test", "not-spam"))
    _publish(mesh, _bounce(account_id, "Hard@Example.test", ev.BOUNCE_TYPE_PERMANENT))
    _publish(mesh, _complaint(account_id, "angry@example.test"))
    with mesh.client(key) as client, mesh.client(other_key) as other:
        deadline = time.monotonic() + 30
        while _suppressed(client, "angry@example.test") is None:
            assert time.monotonic() < deadline, "complaint never reached the suppression list"
            time.sleep(0.1)
        hard = _suppressed(client, "hard@example.test")  # addresses compare case-insensitively
        assert hard is not None and hard.reason == pb.SUPPRESSION_LIST_REASON_BOUNCE
        assert hard.message_id == "m-Hard@Example.test" and hard.feedback_id == "fb-Hard@Example.test"
        angry = _suppressed(client, "angry@example.test")
        assert angry is not None and angry.reason == pb.SUPPRESSION_LIST_REASON_COMPLAINT
        # Events are handled in order, so the earlier soft bounce and not-spam report were seen first.
        assert _suppressed(client, "soft@example.test") is None
        assert _suppressed(client, "happy@example.test") is None
        # Another account's list is its own.
        assert _suppressed(other, "hard@example.test") is None
        assert other_id != account_id


def test_suppression_list_api(mesh: MeshThread) -> None:
    _, key = mesh.create_account()
    with mesh.client(key) as client:
        for address, reason in [
            ("a@example.test", pb.SUPPRESSION_LIST_REASON_BOUNCE),
            ("b@example.test", pb.SUPPRESSION_LIST_REASON_COMPLAINT),
            ("c@bücher.example", pb.SUPPRESSION_LIST_REASON_BOUNCE),
        ]:
            client.feedback.PutSuppressedDestination(
                pb.PutSuppressedDestinationRequest(email_address=address, reason=reason)
            )
        bounces = client.feedback.ListSuppressedDestinations(
            pb.ListSuppressedDestinationsRequest(reasons=[pb.SUPPRESSION_LIST_REASON_BOUNCE])
        )
        assert [s.email_address for s in bounces.suppressed_destination_summaries] == [
            "a@example.test",
            "c@xn--bcher-kva.example",  # stored as the A-label
        ]
        client.feedback.DeleteSuppressedDestination(
            pb.DeleteSuppressedDestinationRequest(email_address="A@example.test")
        )
        assert _suppressed(client, "a@example.test") is None
        with pytest.raises(grpc.RpcError) as excinfo:
            client.feedback.DeleteSuppressedDestination(
                pb.DeleteSuppressedDestinationRequest(email_address="a@example.test")
            )
        assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as excinfo:
            client.feedback.PutSuppressedDestination(
                pb.PutSuppressedDestinationRequest(email_address="x@example.test")  # no reason
            )
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
