"""Configuration sets and event destinations through the real mesh: SES's names, options, refusals;
and the sender honouring a set at accept (unknown, paused, suppression options, TLS policy queued)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import configuration_sets_pb2 as cs
from postmesh.feedback.v1 import feedback_pb2
from postmesh.identity.v1 import identity_pb2
from postmesh.sender.v1 import queue_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns
from tests.conftest import MeshFactory
from tests.destinations_helpers import webhook
from tests.identity_helpers import create_verified_domain
from tests.sending_helpers import own_nats_server, queued_messages, refusal


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    with own_nats_server(tmp_path / "nats") as url:
        yield url


@pytest.fixture
def accept_mesh(start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str) -> MeshThread:
    return start_mesh(
        sandbox_max_send_rate=1000.0,
        dns_resolver=zone.address,
        dns_check_poll_seconds=3600,
        dns_timeout_seconds=2,
        delivery_workers=0,
        webhook_allow_private_targets=True,
    )


def _send(sender: str, to: str, configuration_set: str) -> pb.SendEmailRequest:
    return pb.SendEmailRequest(
        from_email_address=sender,
        destination=pb.Destination(to_addresses=[to]),
        configuration_set_name=configuration_set,
        content=pb.EmailContent(
            simple=pb.Message(subject=pb.Content(data="Hi"), body=pb.Body(text=pb.Content(data="Hello")))
        ),
    )


def test_configuration_sets_have_ses_operations_and_refusals(accept_mesh: MeshThread) -> None:
    _, key = accept_mesh.create_account()
    _, other_key = accept_mesh.create_account("other")
    with accept_mesh.client(key) as client, accept_mesh.client(other_key) as other:
        fb = client.feedback
        fb.CreateConfigurationSet(cs.CreateConfigurationSetRequest(configuration_set_name="marketing"))
        code, reason, message, _ = refusal(
            lambda: fb.CreateConfigurationSet(
                cs.CreateConfigurationSetRequest(configuration_set_name="marketing")
            )
        )
        assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS")
        assert message == "Configuration set marketing already exists."
        code, _, _, metadata = refusal(
            lambda: fb.CreateConfigurationSet(cs.CreateConfigurationSetRequest(configuration_set_name="a.b"))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and metadata["field"] == "configuration_set_name"

        got = fb.GetConfigurationSet(cs.GetConfigurationSetRequest(configuration_set_name="marketing"))
        found = got.configuration_set
        assert found.sending_options.sending_enabled
        assert found.delivery_options.tls_policy == queue_pb2.TLS_POLICY_OPTIONAL
        assert not found.HasField("suppression_options")

        fb.PutConfigurationSetSendingOptions(
            cs.PutConfigurationSetSendingOptionsRequest(
                configuration_set_name="marketing", sending_enabled=False
            )
        )
        fb.PutConfigurationSetDeliveryOptions(
            cs.PutConfigurationSetDeliveryOptionsRequest(
                configuration_set_name="marketing", tls_policy=queue_pb2.TLS_POLICY_REQUIRE
            )
        )
        fb.PutConfigurationSetReputationOptions(
            cs.PutConfigurationSetReputationOptionsRequest(
                configuration_set_name="marketing", reputation_metrics_enabled=True
            )
        )
        fb.PutConfigurationSetSuppressionOptions(
            cs.PutConfigurationSetSuppressionOptionsRequest(
                configuration_set_name="marketing", suppressed_reasons=["COMPLAINT"]
            )
        )
        fb.PutConfigurationSetTrackingOptions(
            cs.PutConfigurationSetTrackingOptionsRequest(
                configuration_set_name="marketing", custom_redirect_domain="Links.Example.test"
            )
        )
        found = fb.GetConfigurationSet(
            cs.GetConfigurationSetRequest(configuration_set_name="marketing")
        ).configuration_set
        assert not found.sending_options.sending_enabled
        assert found.delivery_options.tls_policy == queue_pb2.TLS_POLICY_REQUIRE
        assert found.reputation_options.reputation_metrics_enabled
        assert list(found.suppression_options.suppressed_reasons) == ["COMPLAINT"]
        assert found.tracking_options.custom_redirect_domain == "links.example.test"
        code, _, _, _ = refusal(
            lambda: fb.PutConfigurationSetSuppressionOptions(
                cs.PutConfigurationSetSuppressionOptionsRequest(
                    configuration_set_name="marketing", suppressed_reasons=["SPAM"]
                )
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT

        for i in range(3):
            fb.CreateConfigurationSet(cs.CreateConfigurationSetRequest(configuration_set_name=f"set-{i}"))
        first = fb.ListConfigurationSets(cs.ListConfigurationSetsRequest(page_size=2))
        rest = fb.ListConfigurationSets(cs.ListConfigurationSetsRequest(page_token=first.next_page_token))
        assert [*first.configuration_sets, *rest.configuration_sets] == [
            "marketing",
            "set-0",
            "set-1",
            "set-2",
        ]

        # Another account sees none of it, and may use the same names.
        code, _, message, _ = refusal(
            lambda: other.feedback.GetConfigurationSet(
                cs.GetConfigurationSetRequest(configuration_set_name="marketing")
            )
        )
        assert (code, message) == (grpc.StatusCode.NOT_FOUND, "Configuration set marketing does not exist.")
        assert (
            list(other.feedback.ListConfigurationSets(cs.ListConfigurationSetsRequest()).configuration_sets)
            == []
        )
        other.feedback.CreateConfigurationSet(
            cs.CreateConfigurationSetRequest(configuration_set_name="marketing")
        )

        fb.DeleteConfigurationSet(cs.DeleteConfigurationSetRequest(configuration_set_name="set-0"))
        code, _, _, _ = refusal(
            lambda: fb.DeleteConfigurationSet(
                cs.DeleteConfigurationSetRequest(configuration_set_name="set-0")
            )
        )
        assert code == grpc.StatusCode.NOT_FOUND


def test_event_destinations_validate_targets_types_and_limits(accept_mesh: MeshThread) -> None:
    _, key = accept_mesh.create_account()
    own = accept_mesh.address
    with accept_mesh.client(key) as client:
        fb = client.feedback
        fb.CreateConfigurationSet(cs.CreateConfigurationSetRequest(configuration_set_name="s"))

        def create(name: str, definition: cs.EventDestinationDefinition) -> str:
            return fb.CreateConfigurationSetEventDestination(
                cs.CreateConfigurationSetEventDestinationRequest(
                    configuration_set_name="s", event_destination_name=name, event_destination=definition
                )
            ).signing_secret

        bounce = ev.EMAIL_EVENT_TYPE_BOUNCE
        secret = create("hook", webhook("http://127.0.0.1:9/hook", bounce, ev.EMAIL_EVENT_TYPE_SEND))
        assert secret.startswith("whsec_") and len(secret) > 40
        for url in [
            "ftp://127.0.0.1/x",
            "file:///etc/passwd",
            "http://user:pw@127.0.0.1:9/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fe80::1]/x",
            "http://[::ffff:169.254.169.254]/x",
            "http://metadata.google.internal/x",
            "http://0.0.0.0:9/x",
            f"http://{own}/feedback",
            "http:///nohost",
            "not a url",
        ]:
            code, _, _, metadata = refusal(lambda url=url: create("bad", webhook(url, bounce)))  # type: ignore[misc]
            assert code == grpc.StatusCode.INVALID_ARGUMENT, url
            assert metadata["field"] == "event_destination.webhook.url", url
        for types in ([], [99]):
            code, _, _, metadata = refusal(
                lambda types=types: create("bad", webhook("http://127.0.0.1:9/x", *types))  # type: ignore[misc]
            )
            assert (code, metadata["field"]) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "event_destination.matching_event_types",
            )
        code, _, _, _ = refusal(lambda: create("hook", webhook("http://127.0.0.1:9/other", bounce)))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        code, _, _, _ = refusal(
            lambda: create(
                "subject",
                cs.EventDestinationDefinition(
                    enabled=True,
                    matching_event_types=[bounce],
                    nats_subject=cs.NatsSubjectDestination(subject="postmesh.events.>"),
                ),
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        create(
            "subject",
            cs.EventDestinationDefinition(
                enabled=True,
                matching_event_types=[bounce],
                nats_subject=cs.NatsSubjectDestination(subject="app.ses"),
            ),
        )
        for i in range(8):
            create(f"more-{i}", webhook(f"http://127.0.0.1:9/{i}", bounce))
        code, reason, _, _ = refusal(lambda: create("eleventh", webhook("http://127.0.0.1:9/11", bounce)))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED")

        listed = fb.GetConfigurationSetEventDestinations(
            cs.GetConfigurationSetEventDestinationsRequest(configuration_set_name="s")
        ).event_destinations
        assert len(listed) == 10
        hook = next(d for d in listed if d.name == "hook")
        assert hook.webhook.url == "http://127.0.0.1:9/hook"
        assert hook.webhook.format == cs.WEBHOOK_FORMAT_JSON
        assert hook.webhook.subscription_status == cs.SUBSCRIPTION_STATUS_CONFIRMED
        assert list(hook.matching_event_types) == [ev.EMAIL_EVENT_TYPE_SEND, bounce]
        subject = next(d for d in listed if d.name == "subject")
        assert subject.nats_subject.full_subject.startswith("postmesh-user.")
        assert subject.nats_subject.full_subject.endswith(".app.ses")

        fb.UpdateConfigurationSetEventDestination(
            cs.UpdateConfigurationSetEventDestinationRequest(
                configuration_set_name="s",
                event_destination_name="hook",
                event_destination=webhook("http://127.0.0.1:9/hook", bounce, enabled=False),
            )
        )
        code, _, _, _ = refusal(
            lambda: fb.UpdateConfigurationSetEventDestination(
                cs.UpdateConfigurationSetEventDestinationRequest(
                    configuration_set_name="s",
                    event_destination_name="hook",
                    event_destination=cs.EventDestinationDefinition(
                        enabled=True,
                        matching_event_types=[bounce],
                        nats_subject=cs.NatsSubjectDestination(subject="x"),
                    ),
                )
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        fb.DeleteConfigurationSetEventDestination(
            cs.DeleteConfigurationSetEventDestinationRequest(
                configuration_set_name="s", event_destination_name="more-0"
            )
        )
        listed = fb.GetConfigurationSetEventDestinations(
            cs.GetConfigurationSetEventDestinationsRequest(configuration_set_name="s")
        ).event_destinations
        assert len(listed) == 9
        hook = next(d for d in listed if d.name == "hook")
        assert not hook.enabled and list(hook.matching_event_types) == [bounce]


def test_the_sender_honours_the_configuration_set(accept_mesh: MeshThread, zone: LoopbackDns) -> None:
    account_id, key = accept_mesh.create_account()
    nats_url = accept_mesh.settings.nats_url
    with accept_mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        fb = client.feedback
        code, _, message, _ = refusal(
            lambda: client.sender.SendEmail(_send("a@example.test", "r@example.test", "nope"))
        )
        assert (code, message) == (grpc.StatusCode.NOT_FOUND, "Configuration set nope does not exist.")

        fb.CreateConfigurationSet(
            cs.CreateConfigurationSetRequest(
                configuration_set_name="secure",
                delivery_options=cs.DeliveryOptions(
                    tls_policy=queue_pb2.TLS_POLICY_REQUIRE, max_delivery_seconds=600
                ),
                suppression_options=cs.SuppressionOptions(suppressed_reasons=["COMPLAINT"]),
            )
        )
        for address, reason in [
            ("bounced@example.test", feedback_pb2.SUPPRESSION_LIST_REASON_BOUNCE),
            ("complained@example.test", feedback_pb2.SUPPRESSION_LIST_REASON_COMPLAINT),
        ]:
            fb.PutSuppressedDestination(
                feedback_pb2.PutSuppressedDestinationRequest(email_address=address, reason=reason)
            )
        ids = [
            client.sender.SendEmail(_send("a@example.test", to, "secure")).message_id
            for to in ("r@example.test", "bounced@example.test", "complained@example.test")
        ]
        queued = {q.message_id: q for q in queued_messages(nats_url, account_id, wait_for=2)}
        # The set suppresses complaints only: the bounced address is sent to, the complained one not.
        assert set(queued) == set(ids[:2])
        assert all(q.tls_policy == queue_pb2.TLS_POLICY_REQUIRE for q in queued.values())
        assert all(q.configuration_set_name == "secure" for q in queued.values())
        for q in queued.values():  # SES's MaxDeliverySeconds: retries end 600 s after accept
            assert q.expire_time.ToSeconds() - q.accepted_time.ToSeconds() == 600
        code, _, _, metadata = refusal(
            lambda: fb.PutConfigurationSetDeliveryOptions(
                cs.PutConfigurationSetDeliveryOptionsRequest(
                    configuration_set_name="secure", max_delivery_seconds=100
                )
            )
        )
        assert (code, metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "max_delivery_seconds")

        # The identity's default set applies to sends that name none.
        code, _, message, _ = refusal(
            lambda: client.identity.PutEmailIdentityConfigurationSetAttributes(
                identity_pb2.PutEmailIdentityConfigurationSetAttributesRequest(
                    email_identity="example.test", configuration_set_name="nope"
                )
            )
        )
        assert (code, message) == (grpc.StatusCode.NOT_FOUND, "Configuration set nope does not exist.")
        client.identity.PutEmailIdentityConfigurationSetAttributes(
            identity_pb2.PutEmailIdentityConfigurationSetAttributesRequest(
                email_identity="example.test", configuration_set_name="secure"
            )
        )
        shown = client.identity.GetEmailIdentity(
            identity_pb2.GetEmailIdentityRequest(email_identity="example.test")
        )
        assert shown.configuration_set_name == "secure"
        # The set's suppression options apply too: complaints only, so the bounced address is sent to.
        by_default = client.sender.SendEmail(_send("a@example.test", "bounced@example.test", "")).message_id
        client.sender.SendEmail(_send("a@example.test", "complained@example.test", ""))
        (only,) = queued_messages(nats_url, account_id, wait_for=1)
        assert only.message_id == by_default
        assert only.configuration_set_name == "secure" and only.tls_policy == queue_pb2.TLS_POLICY_REQUIRE

        # Paused: SES's MessageRejected, at once (the sender's kept copy is dropped by the change event).
        fb.PutConfigurationSetSendingOptions(
            cs.PutConfigurationSetSendingOptionsRequest(
                configuration_set_name="secure", sending_enabled=False
            )
        )
        code, why, message, _ = refusal(
            lambda: client.sender.SendEmail(_send("a@example.test", "r@example.test", "secure"))
        )
        assert (code, why) == (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_REJECTED")
        assert message == "Sending is paused for this configuration set."
        # ... also through the identity's default set.
        code, why, _, _ = refusal(
            lambda: client.sender.SendEmail(_send("a@example.test", "r@example.test", ""))
        )
        assert (code, why) == (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_REJECTED")
        # A default set deleted since is ignored.
        fb.DeleteConfigurationSet(cs.DeleteConfigurationSetRequest(configuration_set_name="secure"))
        client.sender.SendEmail(_send("a@example.test", "r@example.test", ""))


_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


def test_hostile_configuration_sets_and_destinations_get_clear_refusals(accept_mesh: MeshThread) -> None:
    """Any name, URL, subject, event type or format: accepted, or refused with a clear status; never
    INTERNAL or UNKNOWN. And the stream refuses a bad opening the same way."""
    _, key = accept_mesh.create_account()
    with accept_mesh.client(key) as client:
        fb = client.feedback
        fb.CreateConfigurationSet(cs.CreateConfigurationSetRequest(configuration_set_name="s"))

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            set_name=st.text(max_size=80),
            name=st.text(max_size=80),
            url=st.one_of(
                st.text(max_size=120), st.from_regex(r"https?://[a-z0-9.:\[\]@-]{0,40}/?", fullmatch=True)
            ),
            subject=st.text(max_size=60),
            types=st.lists(st.integers(min_value=-5, max_value=20), max_size=4),
            fmt=st.integers(min_value=0, max_value=5),
            webhook_target=st.booleans(),
            tls=st.integers(min_value=-1, max_value=5),
        )
        def check(
            set_name: str,
            name: str,
            url: str,
            subject: str,
            types: list[int],
            fmt: int,
            webhook_target: bool,
            tls: int,
        ) -> None:
            definition = cs.EventDestinationDefinition(enabled=True, matching_event_types=types)  # type: ignore[arg-type]
            if webhook_target:
                definition.webhook.CopyFrom(cs.WebhookDestination(url=url, format=fmt))  # type: ignore[arg-type]
            else:
                definition.nats_subject.CopyFrom(cs.NatsSubjectDestination(subject=subject, format=fmt))  # type: ignore[arg-type]
            calls = [
                lambda: fb.CreateConfigurationSetEventDestination(
                    cs.CreateConfigurationSetEventDestinationRequest(
                        configuration_set_name="s", event_destination_name=name, event_destination=definition
                    )
                ),
                lambda: fb.CreateConfigurationSet(
                    cs.CreateConfigurationSetRequest(
                        configuration_set_name=set_name,
                        delivery_options=cs.DeliveryOptions(tls_policy=tls),  # type: ignore[arg-type]
                    )
                ),
                lambda: fb.GetConfigurationSet(
                    cs.GetConfigurationSetRequest(configuration_set_name=set_name)
                ),
                lambda: fb.DeleteConfigurationSet(
                    cs.DeleteConfigurationSetRequest(configuration_set_name=set_name)
                ),
            ]
            for call in calls:
                try:
                    call()
                except grpc.RpcError as exc:
                    assert exc.code() in _REFUSALS, (exc.code(), exc.details())

        check()

        for opening in (
            cs.SubscribeEventsRequest(subscription_name=""),
            cs.SubscribeEventsRequest(subscription_name="a.b"),
            cs.SubscribeEventsRequest(subscription_name="ok", event_types=[77]),  # type: ignore[list-item]
        ):
            with pytest.raises(grpc.RpcError) as raised:
                list(fb.SubscribeEvents(iter([opening])))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
