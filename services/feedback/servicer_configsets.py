"""gRPC surface of configuration sets, event destinations, dead letters and SubscribeEvents."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence

from grpc import aio

from postmesh.common.auth import caller_account_id
from postmesh.common.errors import FailedPrecondition, InvalidArgument
from postmesh.common.protoutil import timestamp
from postmesh.feedback.v1 import configuration_sets_pb2 as cs
from postmesh.sender.v1 import filtration_pb2, queue_pb2
from services.feedback.configsets import (
    CONFIRMED,
    NATS,
    PENDING_CONFIRMATION,
    WEBHOOK,
    ConfigurationSets,
    DestinationSpec,
    Options,
    Target,
    check_reasons,
)
from services.feedback.destinations import sesjson
from services.feedback.destinations.signing import SecretBox, new_secret
from services.feedback.destinations.sns import SIGNATURE_VERSIONS
from services.feedback.destinations.sns_subscriptions import SNS, SnsSubscriptions, subscription_of
from services.feedback.destinations.subscriptions import Subscriptions, opening_of
from services.feedback.destinations.targets import check_subject, check_webhook_url, full_subject
from services.feedback.destinations.webhooks import WebhookOutbox
from services.feedback.models import ConfigurationSet, EventDestination

_TLS_PREFIX = "TLS_POLICY_"


def _tls_name(value: int) -> str:
    if value == queue_pb2.TLS_POLICY_UNSPECIFIED:
        return "OPTIONAL"
    try:
        return queue_pb2.TlsPolicy.Name(value).removeprefix(_TLS_PREFIX)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgument("tls_policy must be REQUIRE or OPTIONAL.", field="tls_policy") from None


_SPAM_PREFIX = "SPAM_POLICY_MODE_"


def _spam_policy(policy: filtration_pb2.SpamPolicy) -> tuple[str, float]:
    """(mode name, threshold) of a set's spam policy; mode UNSPECIFIED: ("", 0), none of its own."""
    if policy.mode == filtration_pb2.SPAM_POLICY_MODE_UNSPECIFIED:
        return "", 0.0
    try:
        name = filtration_pb2.SpamPolicyMode.Name(policy.mode)
    except ValueError:
        raise InvalidArgument(f"Unknown spam policy mode {policy.mode}.", field="spam_policy.mode") from None
    return name.removeprefix(_SPAM_PREFIX).lower(), policy.threshold


def configuration_set_message(row: ConfigurationSet) -> cs.ConfigurationSet:
    message = cs.ConfigurationSet(
        configuration_set_name=row.name,
        sending_options=cs.SendingOptions(sending_enabled=row.sending_enabled),
        delivery_options=cs.DeliveryOptions(
            tls_policy=queue_pb2.TlsPolicy.Value(_TLS_PREFIX + row.tls_policy),
            max_delivery_seconds=row.max_delivery_seconds,
        ),
        reputation_options=cs.ReputationOptions(reputation_metrics_enabled=row.reputation_metrics_enabled),
        tracking_options=cs.TrackingOptions(custom_redirect_domain=row.custom_redirect_domain),
        created_time=timestamp(row.created_at),
    )
    if row.spam_policy:
        message.filtration_options.spam_policy.CopyFrom(
            filtration_pb2.SpamPolicy(
                mode=filtration_pb2.SpamPolicyMode.Value(_SPAM_PREFIX + row.spam_policy.upper()),
                threshold=row.spam_threshold,
            )
        )
    if row.suppressed_reasons is not None:
        message.suppression_options.CopyFrom(
            cs.SuppressionOptions(suppressed_reasons=[r for r in row.suppressed_reasons.split(",") if r])
        )
    return message


def _type_names(values: Sequence[int]) -> list[str]:
    names = []
    for value in values:
        name = sesjson.API_NAMES.get(value)
        if name is None:
            raise InvalidArgument(
                f"Unknown event type {value}.", field="event_destination.matching_event_types"
            )
        names.append(name)
    return names


def destination_message(row: EventDestination, nats_prefix: str) -> cs.EventDestination:
    message = cs.EventDestination(
        name=row.name,
        enabled=row.enabled,
        matching_event_types=[sesjson.BY_API_NAME[t] for t in row.event_types.split(",") if t],  # type: ignore[misc]
    )
    if row.kind == WEBHOOK:
        message.webhook.CopyFrom(
            cs.WebhookDestination(
                url=row.target,
                format=cs.WebhookFormat.Value("WEBHOOK_FORMAT_" + row.format),
                subscription_status=cs.SubscriptionStatus.Value(
                    "SUBSCRIPTION_STATUS_" + row.subscription_status
                ),
            )
        )
        if row.format == SNS:
            message.webhook.signature_version = row.signature_version
            message.webhook.topic_arn = row.topic_arn
            message.webhook.subscription_arn = subscription_of(row)
    else:
        message.nats_subject.CopyFrom(
            cs.NatsSubjectDestination(
                subject=row.target,
                format=cs.NatsPayloadFormat.Value("NATS_PAYLOAD_FORMAT_" + row.format),
                full_subject=full_subject(nats_prefix, row.account_id, row.target),
            )
        )
    return message


class ConfigurationSetsServicer:
    """Mixed into FeedbackServicer; the parts are bound in FeedbackService.on_ready."""

    configuration_sets: ConfigurationSets
    secret_box: SecretBox
    outbox: WebhookOutbox
    subscriptions: Subscriptions
    webhook_formats: Callable[[], set[str]]
    # None when SNS-format destinations are off (no SNS_HTTPS_LISTEN).
    sns_subscriptions: SnsSubscriptions | None
    allow_private_targets: bool
    own_endpoints: list[str]
    nats_prefix: str

    # --- sets

    async def CreateConfigurationSet(
        self, request: cs.CreateConfigurationSetRequest, context: aio.ServicerContext
    ) -> cs.CreateConfigurationSetResponse:
        options = Options(
            sending_enabled=(
                request.sending_options.sending_enabled if request.HasField("sending_options") else True
            ),
            tls_policy=_tls_name(request.delivery_options.tls_policy),
            max_delivery_seconds=request.delivery_options.max_delivery_seconds,
            reputation_metrics_enabled=request.reputation_options.reputation_metrics_enabled,
            suppressed_reasons=(
                list(request.suppression_options.suppressed_reasons)
                if request.HasField("suppression_options")
                else None
            ),
            custom_redirect_domain=request.tracking_options.custom_redirect_domain,
        )
        if request.filtration_options.HasField("spam_policy"):
            mode, threshold = _spam_policy(request.filtration_options.spam_policy)
            options = dataclasses.replace(options, spam_policy=mode, spam_threshold=threshold)
        await self.configuration_sets.create(caller_account_id(), request.configuration_set_name, options)
        return cs.CreateConfigurationSetResponse()

    async def GetConfigurationSet(
        self, request: cs.GetConfigurationSetRequest, context: aio.ServicerContext
    ) -> cs.GetConfigurationSetResponse:
        row = await self.configuration_sets.get(caller_account_id(), request.configuration_set_name)
        return cs.GetConfigurationSetResponse(configuration_set=configuration_set_message(row))

    async def ListConfigurationSets(
        self, request: cs.ListConfigurationSetsRequest, context: aio.ServicerContext
    ) -> cs.ListConfigurationSetsResponse:
        names, token = await self.configuration_sets.names(
            caller_account_id(), request.page_size, request.page_token
        )
        return cs.ListConfigurationSetsResponse(configuration_sets=names, next_page_token=token)

    async def DeleteConfigurationSet(
        self, request: cs.DeleteConfigurationSetRequest, context: aio.ServicerContext
    ) -> cs.DeleteConfigurationSetResponse:
        await self.configuration_sets.delete(caller_account_id(), request.configuration_set_name)
        return cs.DeleteConfigurationSetResponse()

    async def PutConfigurationSetSendingOptions(
        self, request: cs.PutConfigurationSetSendingOptionsRequest, context: aio.ServicerContext
    ) -> cs.PutConfigurationSetSendingOptionsResponse:
        await self.configuration_sets.update(
            caller_account_id(), request.configuration_set_name, sending_enabled=request.sending_enabled
        )
        return cs.PutConfigurationSetSendingOptionsResponse()

    async def PutConfigurationSetDeliveryOptions(
        self, request: cs.PutConfigurationSetDeliveryOptionsRequest, context: aio.ServicerContext
    ) -> cs.PutConfigurationSetDeliveryOptionsResponse:
        await self.configuration_sets.update(
            caller_account_id(),
            request.configuration_set_name,
            tls_policy=_tls_name(request.tls_policy),
            max_delivery_seconds=request.max_delivery_seconds,
        )
        return cs.PutConfigurationSetDeliveryOptionsResponse()

    async def PutConfigurationSetReputationOptions(
        self, request: cs.PutConfigurationSetReputationOptionsRequest, context: aio.ServicerContext
    ) -> cs.PutConfigurationSetReputationOptionsResponse:
        await self.configuration_sets.update(
            caller_account_id(),
            request.configuration_set_name,
            reputation_metrics_enabled=request.reputation_metrics_enabled,
        )
        return cs.PutConfigurationSetReputationOptionsResponse()

    async def PutConfigurationSetSuppressionOptions(
        self, request: cs.PutConfigurationSetSuppressionOptionsRequest, context: aio.ServicerContext
    ) -> cs.PutConfigurationSetSuppressionOptionsResponse:
        reasons = None if request.use_account_level else check_reasons(request.suppressed_reasons)
        await self.configuration_sets.update(
            caller_account_id(), request.configuration_set_name, suppressed_reasons=reasons
        )
        return cs.PutConfigurationSetSuppressionOptionsResponse()

    async def PutConfigurationSetTrackingOptions(
        self, request: cs.PutConfigurationSetTrackingOptionsRequest, context: aio.ServicerContext
    ) -> cs.PutConfigurationSetTrackingOptionsResponse:
        domain = request.custom_redirect_domain.strip().lower().rstrip(".")
        if domain and not _looks_like_domain(domain):
            raise InvalidArgument(
                "custom_redirect_domain is not a domain name.", field="custom_redirect_domain"
            )
        await self.configuration_sets.update(
            caller_account_id(), request.configuration_set_name, custom_redirect_domain=domain
        )
        return cs.PutConfigurationSetTrackingOptionsResponse()

    async def PutConfigurationSetFiltrationOptions(
        self, request: cs.PutConfigurationSetFiltrationOptionsRequest, context: aio.ServicerContext
    ) -> cs.PutConfigurationSetFiltrationOptionsResponse:
        mode, threshold = _spam_policy(request.spam_policy)
        await self.configuration_sets.update(
            caller_account_id(),
            request.configuration_set_name,
            spam_policy=mode,
            spam_threshold=threshold,
        )
        return cs.PutConfigurationSetFiltrationOptionsResponse()

    # --- event destinations

    def _spec(self, definition: cs.EventDestinationDefinition) -> DestinationSpec:
        types = _type_names(definition.matching_event_types)
        kind = definition.WhichOneof("target")
        if kind == "webhook":
            url = check_webhook_url(
                definition.webhook.url,
                allow_private=self.allow_private_targets,
                own_endpoints=self.own_endpoints,
            )
            fmt = definition.webhook.format
            name = (
                "JSON"
                if fmt == cs.WEBHOOK_FORMAT_UNSPECIFIED
                else cs.WebhookFormat.Name(fmt).removeprefix("WEBHOOK_FORMAT_")
            )
            if name not in self.webhook_formats():
                raise FailedPrecondition(
                    f"The {name} webhook format is not available on this postmesh.",
                    reason="UNSUPPORTED_FORMAT",
                )
            status = PENDING_CONFIRMATION if name == SNS else CONFIRMED
            version = definition.webhook.signature_version
            if name != SNS and version:
                raise InvalidArgument(
                    "signature_version applies to the SNS format only.", field="signature_version"
                )
            if version and version not in SIGNATURE_VERSIONS:
                raise InvalidArgument("signature_version must be 1 or 2.", field="signature_version")
            return DestinationSpec(
                definition.enabled, types, Target(WEBHOOK, url, name, status, signature_version=version or 1)
            )
        if kind == "nats_subject":
            subject = check_subject(definition.nats_subject.subject)
            nats_format = definition.nats_subject.format
            name = (
                "JSON"
                if nats_format == cs.NATS_PAYLOAD_FORMAT_UNSPECIFIED
                else cs.NatsPayloadFormat.Name(nats_format).removeprefix("NATS_PAYLOAD_FORMAT_")
            )
            return DestinationSpec(definition.enabled, types, Target(NATS, subject, name))
        raise InvalidArgument(
            "The event destination needs a target: webhook or nats_subject.", field="event_destination"
        )

    async def CreateConfigurationSetEventDestination(
        self, request: cs.CreateConfigurationSetEventDestinationRequest, context: aio.ServicerContext
    ) -> cs.CreateConfigurationSetEventDestinationResponse:
        account_id = caller_account_id()
        spec = self._spec(request.event_destination)
        secret = new_secret() if spec.target.kind == WEBHOOK else ""
        await self.configuration_sets.add_destination(
            account_id,
            request.configuration_set_name,
            request.event_destination_name,
            spec,
            self.secret_box.seal(account_id, secret) if secret else b"",
        )
        await self._subscribe(
            account_id, request.configuration_set_name, request.event_destination_name, spec
        )
        return cs.CreateConfigurationSetEventDestinationResponse(signing_secret=secret)

    async def _subscribe(self, account_id: str, set_name: str, name: str, spec: DestinationSpec) -> None:
        """An SNS destination, new or re-pointed, gets its SubscriptionConfirmation first."""
        if spec.target.format == SNS and self.sns_subscriptions is not None:
            await self.sns_subscriptions.subscribe(account_id, set_name, name)

    async def ConfirmConfigurationSetEventDestination(
        self, request: cs.ConfirmConfigurationSetEventDestinationRequest, context: aio.ServicerContext
    ) -> cs.ConfirmConfigurationSetEventDestinationResponse:
        if self.sns_subscriptions is None:
            raise FailedPrecondition(
                "The SNS webhook format is not available on this postmesh.", reason="UNSUPPORTED_FORMAT"
            )
        arn = await self.sns_subscriptions.confirm_destination(
            caller_account_id(), request.configuration_set_name, request.event_destination_name
        )
        return cs.ConfirmConfigurationSetEventDestinationResponse(subscription_arn=arn)

    async def GetConfigurationSetEventDestinations(
        self, request: cs.GetConfigurationSetEventDestinationsRequest, context: aio.ServicerContext
    ) -> cs.GetConfigurationSetEventDestinationsResponse:
        rows = await self.configuration_sets.destinations(caller_account_id(), request.configuration_set_name)
        return cs.GetConfigurationSetEventDestinationsResponse(
            event_destinations=[destination_message(r, self.nats_prefix) for r in rows]
        )

    async def UpdateConfigurationSetEventDestination(
        self, request: cs.UpdateConfigurationSetEventDestinationRequest, context: aio.ServicerContext
    ) -> cs.UpdateConfigurationSetEventDestinationResponse:
        account_id = caller_account_id()
        spec = self._spec(request.event_destination)
        await self.configuration_sets.update_destination(
            account_id, request.configuration_set_name, request.event_destination_name, spec
        )
        await self._subscribe(
            account_id, request.configuration_set_name, request.event_destination_name, spec
        )
        return cs.UpdateConfigurationSetEventDestinationResponse()

    async def DeleteConfigurationSetEventDestination(
        self, request: cs.DeleteConfigurationSetEventDestinationRequest, context: aio.ServicerContext
    ) -> cs.DeleteConfigurationSetEventDestinationResponse:
        await self.configuration_sets.remove_destination(
            caller_account_id(), request.configuration_set_name, request.event_destination_name
        )
        return cs.DeleteConfigurationSetEventDestinationResponse()

    # --- dead letters (operator)

    async def ListDeadLetters(
        self, request: cs.ListDeadLettersRequest, context: aio.ServicerContext
    ) -> cs.ListDeadLettersResponse:
        rows, token = await self.outbox.dead_letters(
            request.account_id, request.page_size, request.page_token
        )
        letters = [
            cs.DeadLetter(
                id=row.id,
                account_id=row.account_id,
                configuration_set_name=owner.name,
                event_destination_name=destination.name,
                event_id=row.event_id,
                url=destination.target,
                attempts=row.attempts,
                last_error=row.last_error,
                first_attempt_time=timestamp(row.first_attempt_at),
                dead_time=timestamp(row.dead_at) if row.dead_at else None,
            )
            for row, destination, owner in rows
        ]
        return cs.ListDeadLettersResponse(dead_letters=letters, next_page_token=token)

    async def ReplayDeadLetters(
        self, request: cs.ReplayDeadLettersRequest, context: aio.ServicerContext
    ) -> cs.ReplayDeadLettersResponse:
        count = await self.outbox.replay(list(request.ids), every=request.all, account_id=request.account_id)
        return cs.ReplayDeadLettersResponse(replayed=count)

    # --- the event stream

    async def SubscribeEvents(
        self, request_iterator: AsyncIterator[cs.SubscribeEventsRequest], context: aio.ServicerContext
    ) -> AsyncIterator[cs.SubscribeEventsResponse]:
        account_id = caller_account_id()
        first = await anext(request_iterator, None)
        if first is None:
            return
        _type_names(first.event_types)
        opening = opening_of(first.subscription_name, list(first.event_types))

        async def acks() -> AsyncIterator[Sequence[str]]:
            if first.ack_event_ids:
                yield list(first.ack_event_ids)
            async for request in request_iterator:
                yield list(request.ack_event_ids)

        subscription = await self.subscriptions.open(account_id, opening)
        # Headers go out once the subscription exists: from then on nothing published is missed.
        await context.send_initial_metadata((("x-postmesh-subscription", opening.name),))
        async for event in self.subscriptions.follow(account_id, subscription, acks()):
            yield cs.SubscribeEventsResponse(event=event, ses_json=sesjson.event_json(event))

    async def DeleteEventSubscription(
        self, request: cs.DeleteEventSubscriptionRequest, context: aio.ServicerContext
    ) -> cs.DeleteEventSubscriptionResponse:
        await self.subscriptions.delete(caller_account_id(), request.subscription_name)
        return cs.DeleteEventSubscriptionResponse()


def _looks_like_domain(domain: str) -> bool:
    labels = domain.split(".")
    return (
        len(domain) <= 253
        and len(labels) >= 2
        and all(label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels)
    )
