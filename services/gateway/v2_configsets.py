"""SES v2 configuration sets and their event destinations, on the feedback service's RPCs.

SES publishes events to SNS, EventBridge, Firehose, CloudWatch or Pinpoint; postmesh has webhooks
(SES JSON or Amazon SNS's HTTP/S format) and NATS subjects. `SnsDestination` maps to an SNS-format
webhook: its `TopicArn` is the http(s) endpoint that receives SNS's notifications (postmesh has no
SNS topics, so the one subscriber stands for the topic). The other SES destination types are refused.
"""

from __future__ import annotations

from typing import Any

from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import configuration_sets_pb2 as cs
from postmesh.sender.v1 import queue_pb2 as qb
from services.gateway.calls import AccountCalls
from services.gateway.errors import BAD_REQUEST, ApiError
from services.gateway.shapes import boolean, epoch, integer, obj, string, strings, without_none
from services.gateway.v2_common import JSON, Handler, V2Request, enum_name, enum_value, page_size, unsupported

_REASONS = ("BOUNCE", "COMPLAINT")
_UNSUPPORTED_DESTINATIONS = (
    "KinesisFirehoseDestination",
    "CloudWatchDestination",
    "EventBridgeDestination",
    "PinpointDestination",
)


def _reasons(data: JSON, member: str) -> list[str]:
    reasons = strings(data, member)
    for reason in reasons:
        if reason not in _REASONS:
            raise ApiError(BAD_REQUEST, f"{member} {reason[:64]!r} is not a valid value (BOUNCE, COMPLAINT).")
    return list(dict.fromkeys(reasons))


def _tls_policy(text: str) -> Any:
    return enum_value(qb.TlsPolicy, text, "TLS_POLICY_", "TlsPolicy")


def _delivery_options(data: JSON) -> cs.DeliveryOptions:
    unsupported(data, "SendingPoolName", "SharedPoolDeliveryMode")
    return cs.DeliveryOptions(
        tls_policy=_tls_policy(string(data, "TlsPolicy")),
        max_delivery_seconds=integer(data, "MaxDeliverySeconds"),
    )


def _tracking_options(data: JSON) -> cs.TrackingOptions:
    unsupported(data, "HttpsPolicy")
    return cs.TrackingOptions(custom_redirect_domain=string(data, "CustomRedirectDomain"))


async def create_configuration_set(call: AccountCalls, req: V2Request) -> JSON:
    body = req.body
    unsupported(body, "Tags", "VdmOptions", "ArchivingOptions", "MessageSecurityOptions")
    request = cs.CreateConfigurationSetRequest(configuration_set_name=string(body, "ConfigurationSetName"))
    if body.get("SendingOptions") is not None:
        sending = boolean(obj(body, "SendingOptions"), "SendingEnabled")
        request.sending_options.sending_enabled = sending is not False
    if body.get("DeliveryOptions") is not None:
        request.delivery_options.CopyFrom(_delivery_options(obj(body, "DeliveryOptions")))
    if body.get("ReputationOptions") is not None:
        reputation = obj(body, "ReputationOptions")
        unsupported(reputation, "LastFreshStart")
        request.reputation_options.reputation_metrics_enabled = bool(
            boolean(reputation, "ReputationMetricsEnabled")
        )
    if body.get("SuppressionOptions") is not None:
        suppression = obj(body, "SuppressionOptions")
        unsupported(suppression, "SuppressionScope", "ValidationOptions")
        request.suppression_options.suppressed_reasons.extend(_reasons(suppression, "SuppressedReasons"))
    if body.get("TrackingOptions") is not None:
        request.tracking_options.CopyFrom(_tracking_options(obj(body, "TrackingOptions")))
    await call(call.clients.feedback.CreateConfigurationSet, request)
    return {}


async def get_configuration_set(call: AccountCalls, req: V2Request) -> JSON:
    reply = await call(
        call.clients.feedback.GetConfigurationSet,
        cs.GetConfigurationSetRequest(configuration_set_name=req.path["ConfigurationSetName"]),
    )
    found = reply.configuration_set
    delivery = found.delivery_options
    result: JSON = {
        "ConfigurationSetName": found.configuration_set_name,
        "SendingOptions": {"SendingEnabled": found.sending_options.sending_enabled},
        "DeliveryOptions": without_none(
            {
                "TlsPolicy": enum_name(qb.TlsPolicy, delivery.tls_policy, "TLS_POLICY_") or "OPTIONAL",
                "MaxDeliverySeconds": delivery.max_delivery_seconds or None,
            }
        ),
        "ReputationOptions": without_none(
            {
                "ReputationMetricsEnabled": found.reputation_options.reputation_metrics_enabled,
                "LastFreshStart": epoch(found.reputation_options.last_fresh_start),
            }
        ),
        "Tags": [],
    }
    if found.HasField("suppression_options"):
        result["SuppressionOptions"] = {
            "SuppressedReasons": list(found.suppression_options.suppressed_reasons)
        }
    if found.tracking_options.custom_redirect_domain:
        result["TrackingOptions"] = {"CustomRedirectDomain": found.tracking_options.custom_redirect_domain}
    return result


async def list_configuration_sets(call: AccountCalls, req: V2Request) -> JSON:
    # botocore sends POST /list-configuration-sets with a JSON body; older SDKs GET with a query.
    if req.body:
        unsupported(req.body, "Filter")
        size, token = integer(req.body, "PageSize"), string(req.body, "NextToken")
    else:
        size, token = page_size(req.query), req.query.get("NextToken", "")
    reply = await call(
        call.clients.feedback.ListConfigurationSets,
        cs.ListConfigurationSetsRequest(page_size=size, page_token=token),
    )
    return without_none(
        {"ConfigurationSets": list(reply.configuration_sets), "NextToken": reply.next_page_token or None}
    )


async def delete_configuration_set(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.feedback.DeleteConfigurationSet,
        cs.DeleteConfigurationSetRequest(configuration_set_name=req.path["ConfigurationSetName"]),
    )
    return {}


async def put_configuration_set_sending_options(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.feedback.PutConfigurationSetSendingOptions,
        cs.PutConfigurationSetSendingOptionsRequest(
            configuration_set_name=req.path["ConfigurationSetName"],
            sending_enabled=bool(boolean(req.body, "SendingEnabled")),
        ),
    )
    return {}


async def put_configuration_set_delivery_options(call: AccountCalls, req: V2Request) -> JSON:
    options = _delivery_options(req.body)
    await call(
        call.clients.feedback.PutConfigurationSetDeliveryOptions,
        cs.PutConfigurationSetDeliveryOptionsRequest(
            configuration_set_name=req.path["ConfigurationSetName"],
            tls_policy=options.tls_policy,
            max_delivery_seconds=options.max_delivery_seconds,
        ),
    )
    return {}


async def put_configuration_set_reputation_options(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.feedback.PutConfigurationSetReputationOptions,
        cs.PutConfigurationSetReputationOptionsRequest(
            configuration_set_name=req.path["ConfigurationSetName"],
            reputation_metrics_enabled=bool(boolean(req.body, "ReputationMetricsEnabled")),
        ),
    )
    return {}


async def put_configuration_set_suppression_options(call: AccountCalls, req: V2Request) -> JSON:
    unsupported(req.body, "SuppressionScope", "ValidationOptions")
    # No SuppressedReasons at all: the set follows the account-level list again; a list (even an
    # empty one) is the set's own.
    own = req.body.get("SuppressedReasons") is not None
    await call(
        call.clients.feedback.PutConfigurationSetSuppressionOptions,
        cs.PutConfigurationSetSuppressionOptionsRequest(
            configuration_set_name=req.path["ConfigurationSetName"],
            suppressed_reasons=_reasons(req.body, "SuppressedReasons"),
            use_account_level=not own,
        ),
    )
    return {}


async def put_configuration_set_tracking_options(call: AccountCalls, req: V2Request) -> JSON:
    options = _tracking_options(req.body)
    await call(
        call.clients.feedback.PutConfigurationSetTrackingOptions,
        cs.PutConfigurationSetTrackingOptionsRequest(
            configuration_set_name=req.path["ConfigurationSetName"],
            custom_redirect_domain=options.custom_redirect_domain,
        ),
    )
    return {}


# --- event destinations

_TYPE_PREFIX = "EMAIL_EVENT_TYPE_"


def event_destination_definition(data: JSON) -> cs.EventDestinationDefinition:
    given = [name for name in _UNSUPPORTED_DESTINATIONS if data.get(name) is not None]
    if given:
        raise ApiError(
            BAD_REQUEST,
            f"postmesh does not publish to {given[0]}: use SnsDestination (SNS-format HTTP/S notifications).",
        )
    if data.get("SnsDestination") is None:
        raise ApiError(BAD_REQUEST, "EventDestination needs a destination: postmesh supports SnsDestination.")
    topic = string(obj(data, "SnsDestination"), "TopicArn")
    if not topic.lower().startswith(("http://", "https://")):
        raise ApiError(
            BAD_REQUEST,
            "postmesh has no SNS topics: SnsDestination.TopicArn must be the http(s) URL that receives "
            "the SNS notifications.",
        )
    types = strings(data, "MatchingEventTypes")
    if not types:
        raise ApiError(BAD_REQUEST, "MatchingEventTypes must name at least one event type.")
    return cs.EventDestinationDefinition(
        enabled=bool(boolean(data, "Enabled")),
        matching_event_types=[
            enum_value(ev.EmailEventType, t, _TYPE_PREFIX, "MatchingEventTypes") for t in dict.fromkeys(types)
        ],
        webhook=cs.WebhookDestination(url=topic, format=cs.WEBHOOK_FORMAT_SNS),
    )


def _destination(found: cs.EventDestination) -> JSON:
    result: JSON = {
        "Name": found.name,
        "Enabled": found.enabled,
        "MatchingEventTypes": [
            name
            for value in found.matching_event_types
            if (name := enum_name(ev.EmailEventType, value, _TYPE_PREFIX))
        ],
    }
    # Destinations made through postmesh's own API may have no SES equivalent: they are shown in
    # members of their own, which SDKs ignore.
    kind = found.WhichOneof("target")
    if kind == "webhook":
        webhook = found.webhook
        if webhook.format == cs.WEBHOOK_FORMAT_SNS:
            result["SnsDestination"] = {"TopicArn": webhook.url}
        result["WebhookDestination"] = without_none(
            {
                "Url": webhook.url,
                "Format": enum_name(cs.WebhookFormat, webhook.format, "WEBHOOK_FORMAT_") or "JSON",
                "SubscriptionStatus": enum_name(
                    cs.SubscriptionStatus, webhook.subscription_status, "SUBSCRIPTION_STATUS_"
                ),
            }
        )
    elif kind == "nats_subject":
        nats = found.nats_subject
        result["NatsSubjectDestination"] = without_none(
            {
                "Subject": nats.subject,
                "Format": enum_name(cs.NatsPayloadFormat, nats.format, "NATS_PAYLOAD_FORMAT_") or "JSON",
                "FullSubject": nats.full_subject or None,
            }
        )
    return result


async def create_configuration_set_event_destination(call: AccountCalls, req: V2Request) -> JSON:
    reply = await call(
        call.clients.feedback.CreateConfigurationSetEventDestination,
        cs.CreateConfigurationSetEventDestinationRequest(
            configuration_set_name=req.path["ConfigurationSetName"],
            event_destination_name=string(req.body, "EventDestinationName"),
            event_destination=event_destination_definition(obj(req.body, "EventDestination")),
        ),
    )
    # Not in SES's shape: the key of X-Postmesh-Signature, shown this once.
    return without_none({"SigningSecret": reply.signing_secret or None})


async def get_configuration_set_event_destinations(call: AccountCalls, req: V2Request) -> JSON:
    reply = await call(
        call.clients.feedback.GetConfigurationSetEventDestinations,
        cs.GetConfigurationSetEventDestinationsRequest(
            configuration_set_name=req.path["ConfigurationSetName"]
        ),
    )
    return {"EventDestinations": [_destination(d) for d in reply.event_destinations]}


async def update_configuration_set_event_destination(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.feedback.UpdateConfigurationSetEventDestination,
        cs.UpdateConfigurationSetEventDestinationRequest(
            configuration_set_name=req.path["ConfigurationSetName"],
            event_destination_name=req.path["EventDestinationName"],
            event_destination=event_destination_definition(obj(req.body, "EventDestination")),
        ),
    )
    return {}


async def delete_configuration_set_event_destination(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.feedback.DeleteConfigurationSetEventDestination,
        cs.DeleteConfigurationSetEventDestinationRequest(
            configuration_set_name=req.path["ConfigurationSetName"],
            event_destination_name=req.path["EventDestinationName"],
        ),
    )
    return {}


_SET = "/v2/email/configuration-sets/{ConfigurationSetName}"
_DESTINATION = _SET + "/event-destinations/{EventDestinationName}"
ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/v2/email/configuration-sets", create_configuration_set),
    ("GET", "/v2/email/configuration-sets", list_configuration_sets),
    ("POST", "/v2/email/list-configuration-sets", list_configuration_sets),
    ("GET", _SET, get_configuration_set),
    ("DELETE", _SET, delete_configuration_set),
    ("PUT", f"{_SET}/sending", put_configuration_set_sending_options),
    ("PUT", f"{_SET}/delivery-options", put_configuration_set_delivery_options),
    ("PUT", f"{_SET}/reputation-options", put_configuration_set_reputation_options),
    ("PUT", f"{_SET}/suppression-options", put_configuration_set_suppression_options),
    ("PUT", f"{_SET}/tracking-options", put_configuration_set_tracking_options),
    ("POST", f"{_SET}/event-destinations", create_configuration_set_event_destination),
    ("GET", f"{_SET}/event-destinations", get_configuration_set_event_destinations),
    ("PUT", _DESTINATION, update_configuration_set_event_destination),
    ("DELETE", _DESTINATION, delete_configuration_set_event_destination),
]
