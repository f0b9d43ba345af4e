"""SES v2 (REST JSON, `/v2/email/...`): paths, shapes and errors as botocore's sesv2 model has them."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from postmesh.cli.events import recipients as event_recipients
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import configuration_sets_pb2 as cs
from postmesh.feedback.v1 import feedback_pb2 as fb
from postmesh.identity.v1 import identity_pb2 as ib
from postmesh.quota.v1 import quota_pb2 as qb
from postmesh.sender.v1 import sender_pb2 as sb
from services.gateway.calls import AccountCalls
from services.gateway.errors import (
    ALREADY_EXISTS,
    BAD_REQUEST,
    NOT_FOUND,
    SERIALIZATION,
    UNKNOWN_OPERATION,
    ApiError,
)
from services.gateway.shapes import (
    boolean,
    epoch,
    integer,
    obj,
    objects,
    parse_time,
    string,
    strings,
    without_none,
)
from services.gateway.v2_common import (
    JSON,
    Handler,
    V2Request,
    enum_name,
    enum_value,
    page_size,
    unsupported,
)
from services.gateway.v2_configsets import ROUTES as CONFIGURATION_SET_ROUTES

# --- shapes: SES JSON <-> postmesh messages


def _content(data: JSON) -> sb.Content:
    return sb.Content(data=string(data, "Data"), charset=string(data, "Charset"))


def _headers(items: list[JSON]) -> list[sb.MessageHeader]:
    return [sb.MessageHeader(name=string(h, "Name"), value=string(h, "Value")) for h in items]


def _tags(items: list[JSON]) -> list[sb.MessageTag]:
    return [sb.MessageTag(name=string(t, "Name"), value=string(t, "Value")) for t in items]


def _destination(data: JSON) -> sb.Destination:
    return sb.Destination(
        to_addresses=strings(data, "ToAddresses"),
        cc_addresses=strings(data, "CcAddresses"),
        bcc_addresses=strings(data, "BccAddresses"),
    )


def _raw_data(data: JSON) -> bytes:
    text = string(data, "Data")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(SERIALIZATION, "Content.Raw.Data must be base64-encoded.") from None


def email_content(data: JSON) -> sb.EmailContent:
    given = [name for name in ("Simple", "Raw", "Template") if data.get(name) is not None]
    if len(given) != 1:
        raise ApiError(BAD_REQUEST, "Content must contain exactly one of Simple, Raw or Template.")
    if given == ["Simple"]:
        simple = obj(data, "Simple")
        body = obj(simple, "Body")
        message = sb.Message(
            subject=_content(obj(simple, "Subject")), headers=_headers(objects(simple, "Headers"))
        )
        if body.get("Text") is not None:
            message.body.text.CopyFrom(_content(obj(body, "Text")))
        if body.get("Html") is not None:
            message.body.html.CopyFrom(_content(obj(body, "Html")))
        return sb.EmailContent(simple=message)
    if given == ["Raw"]:
        return sb.EmailContent(raw=sb.RawMessage(data=_raw_data(obj(data, "Raw"))))
    template = obj(data, "Template")
    return sb.EmailContent(template=_template(template))


def _template(template: JSON) -> sb.Template:
    if template.get("TemplateContent") is not None or template.get("Attachments") is not None:
        raise ApiError(
            BAD_REQUEST,
            "Inline TemplateContent and Attachments are not supported: create the template first.",
        )
    name = string(template, "TemplateName") or string(template, "TemplateArn").rpartition("/")[2]
    return sb.Template(
        template_name=name,
        template_data=string(template, "TemplateData"),
        headers=_headers(objects(template, "Headers")),
    )


def _dkim_attributes(dkim: ib.DkimAttributes) -> JSON:
    return without_none(
        {
            "SigningEnabled": dkim.signing_enabled,
            "Status": enum_name(ib.VerificationStatus, dkim.status, "VERIFICATION_STATUS_"),
            "Tokens": list(dkim.tokens),
            "SigningAttributesOrigin": {
                ib.DKIM_SIGNING_ATTRIBUTES_ORIGIN_POSTMESH: "AWS_SES",
                ib.DKIM_SIGNING_ATTRIBUTES_ORIGIN_EXTERNAL: "EXTERNAL",
            }.get(dkim.signing_attributes_origin),
            "NextSigningKeyLength": enum_name(
                ib.DkimSigningKeyLength, dkim.next_signing_key_length, "DKIM_SIGNING_KEY_LENGTH_"
            ),
            "CurrentSigningKeyLength": enum_name(
                ib.DkimSigningKeyLength, dkim.current_signing_key_length, "DKIM_SIGNING_KEY_LENGTH_"
            ),
            "LastKeyGenerationTimestamp": epoch(dkim.last_key_generation_timestamp),
        }
    )


def _dns_records(records: Any) -> list[JSON]:
    # Not in SES's shape (SDKs ignore it): the records postmesh wants published, zone-file style.
    return [{"Name": r.name, "Type": r.type, "Value": r.value, "Purpose": r.purpose} for r in records]


def _identity_type(value: int) -> str | None:
    return enum_name(ib.IdentityType, value, "IDENTITY_TYPE_")


# --- operations


async def create_email_identity(call: AccountCalls, req: V2Request) -> JSON:
    unsupported(req.body, "Tags")
    dkim = obj(req.body, "DkimSigningAttributes")
    request = ib.CreateEmailIdentityRequest(email_identity=string(req.body, "EmailIdentity"))
    if dkim:
        request.dkim_signing_attributes.CopyFrom(_dkim_signing_attributes(dkim))
    configuration_set = string(req.body, "ConfigurationSetName")
    if configuration_set:  # a missing set fails before the identity is made
        await call(
            call.clients.feedback.GetConfigurationSet,
            cs.GetConfigurationSetRequest(configuration_set_name=configuration_set),
        )
    reply = await call(call.clients.identity.CreateEmailIdentity, request)
    if configuration_set:
        await call(
            call.clients.identity.PutEmailIdentityConfigurationSetAttributes,
            ib.PutEmailIdentityConfigurationSetAttributesRequest(
                email_identity=reply.email_identity, configuration_set_name=configuration_set
            ),
        )
    return without_none(
        {
            "IdentityType": _identity_type(reply.identity_type),
            "VerifiedForSendingStatus": reply.verified_for_sending_status,
            "DkimAttributes": _dkim_attributes(reply.dkim_attributes),
            "DnsRecords": _dns_records(reply.dns_records),
        }
    )


async def get_email_identity(call: AccountCalls, req: V2Request) -> JSON:
    reply = await call(
        call.clients.identity.GetEmailIdentity,
        ib.GetEmailIdentityRequest(email_identity=req.path["EmailIdentity"]),
    )
    mail_from = reply.mail_from_attributes
    info = reply.verification_info
    return without_none(
        {
            "IdentityType": _identity_type(reply.identity_type),
            "FeedbackForwardingStatus": reply.feedback_forwarding_status,
            "ConfigurationSetName": reply.configuration_set_name or None,
            "VerifiedForSendingStatus": reply.verified_for_sending_status,
            "DkimAttributes": _dkim_attributes(reply.dkim_attributes),
            "MailFromAttributes": {
                "MailFromDomain": mail_from.mail_from_domain,
                "MailFromDomainStatus": enum_name(
                    ib.MailFromDomainStatus, mail_from.mail_from_domain_status, "MAIL_FROM_DOMAIN_STATUS_"
                )
                or "PENDING",
                "BehaviorOnMxFailure": enum_name(
                    ib.BehaviorOnMxFailure, mail_from.behavior_on_mx_failure, "BEHAVIOR_ON_MX_FAILURE_"
                )
                or "USE_DEFAULT_VALUE",
            },
            "Policies": dict(reply.policies),
            "Tags": [],
            "VerificationStatus": enum_name(
                ib.VerificationStatus, reply.verification_status, "VERIFICATION_STATUS_"
            ),
            "VerificationInfo": without_none(
                {
                    "LastCheckedTimestamp": epoch(info.last_checked_timestamp),
                    "LastSuccessTimestamp": epoch(info.last_success_timestamp),
                    "ErrorType": enum_name(ib.VerificationError, info.error_type, "VERIFICATION_ERROR_"),
                }
            ),
            "DnsRecords": _dns_records(reply.dns_records),
        }
    )


async def list_email_identities(call: AccountCalls, req: V2Request) -> JSON:
    reply = await call(
        call.clients.identity.ListEmailIdentities,
        ib.ListEmailIdentitiesRequest(
            page_size=integer(req.body, "PageSize"), page_token=string(req.body, "NextToken")
        ),
    )
    return without_none(
        {
            "EmailIdentities": [
                without_none(
                    {
                        "IdentityType": _identity_type(i.identity_type),
                        "IdentityName": i.identity_name,
                        "SendingEnabled": i.sending_enabled,
                        "VerificationStatus": enum_name(
                            ib.VerificationStatus, i.verification_status, "VERIFICATION_STATUS_"
                        ),
                    }
                )
                for i in reply.email_identities
            ],
            "NextToken": reply.next_page_token or None,
        }
    )


async def delete_email_identity(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.identity.DeleteEmailIdentity,
        ib.DeleteEmailIdentityRequest(email_identity=req.path["EmailIdentity"]),
    )
    return {}


def _sender_fields(body: JSON) -> dict[str, Any]:
    """The members SendEmail and SendBulkEmail share, as the request messages name them."""
    return {
        "from_email_address": string(body, "FromEmailAddress"),
        "from_email_address_identity_arn": string(body, "FromEmailAddressIdentityArn"),
        "reply_to_addresses": strings(body, "ReplyToAddresses"),
        "feedback_forwarding_email_address": string(body, "FeedbackForwardingEmailAddress"),
        "feedback_forwarding_email_address_identity_arn": string(
            body, "FeedbackForwardingEmailAddressIdentityArn"
        ),
        "configuration_set_name": string(body, "ConfigurationSetName"),
    }


async def send_email(call: AccountCalls, req: V2Request) -> JSON:
    body = req.body
    unsupported(body, "EndpointId", "TenantName", "ListManagementOptions", "ConfigurationOverrides")
    request = sb.SendEmailRequest(
        **_sender_fields(body),
        content=email_content(obj(body, "Content")),
        email_tags=_tags(objects(body, "EmailTags")),
    )
    if body.get("Destination") is not None:
        request.destination.CopyFrom(_destination(obj(body, "Destination")))
    reply = await call(call.clients.sender.SendEmail, request)
    return {"MessageId": reply.message_id}


async def send_bulk_email(call: AccountCalls, req: V2Request) -> JSON:
    body = req.body
    unsupported(body, "EndpointId", "TenantName", "ConfigurationOverrides")
    default = obj(body, "DefaultContent")
    entries = []
    for entry in objects(body, "BulkEmailEntries"):
        replacement = obj(obj(entry, "ReplacementEmailContent"), "ReplacementTemplate")
        item = sb.BulkEmailEntry(
            replacement_tags=_tags(objects(entry, "ReplacementTags")),
            replacement_headers=_headers(objects(entry, "ReplacementHeaders")),
        )
        item.destination.CopyFrom(_destination(obj(entry, "Destination")))
        if replacement:
            item.replacement_email_content.replacement_template.replacement_template_data = string(
                replacement, "ReplacementTemplateData"
            )
        entries.append(item)
    request = sb.SendBulkEmailRequest(
        **_sender_fields(body),
        default_email_tags=_tags(objects(body, "DefaultEmailTags")),
        bulk_email_entries=entries,
    )
    if default.get("Template") is not None:
        request.default_content.template.CopyFrom(_template(obj(default, "Template")))
    reply = await call(call.clients.sender.SendBulkEmail, request)
    return {
        "BulkEmailEntryResults": [
            without_none(
                {
                    "Status": enum_name(sb.BulkEmailStatus, r.status, "BULK_EMAIL_STATUS_"),
                    "Error": r.error or None,
                    "MessageId": r.message_id or None,
                }
            )
            for r in reply.bulk_email_entry_results
        ]
    }


async def put_email_identity_dkim_attributes(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.identity.PutEmailIdentityDkimAttributes,
        ib.PutEmailIdentityDkimAttributesRequest(
            email_identity=req.path["EmailIdentity"],
            signing_enabled=bool(boolean(req.body, "SigningEnabled")),
        ),
    )
    return {}


async def put_email_identity_mail_from_attributes(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.identity.PutEmailIdentityMailFromAttributes,
        ib.PutEmailIdentityMailFromAttributesRequest(
            email_identity=req.path["EmailIdentity"],
            mail_from_domain=string(req.body, "MailFromDomain"),
            behavior_on_mx_failure=enum_value(
                ib.BehaviorOnMxFailure,
                string(req.body, "BehaviorOnMxFailure"),
                "BEHAVIOR_ON_MX_FAILURE_",
                "BehaviorOnMxFailure",
            ),
        ),
    )
    return {}


async def get_account(call: AccountCalls, req: V2Request) -> JSON:
    reply = await call(call.clients.quota.GetAccount, qb.GetAccountRequest())
    suppression = await call(
        call.clients.feedback.GetAccountSuppressionAttributes, fb.GetAccountSuppressionAttributesRequest()
    )
    details = reply.details
    result: JSON = {
        "DedicatedIpAutoWarmupEnabled": False,
        "EnforcementStatus": enum_name(qb.EnforcementStatus, reply.enforcement_status, "ENFORCEMENT_STATUS_"),
        "ProductionAccessEnabled": reply.production_access_enabled,
        "SendingEnabled": reply.sending_enabled,
        "SendQuota": {
            "Max24HourSend": reply.send_quota.max_24_hour_send,
            "MaxSendRate": reply.send_quota.max_send_rate,
            "SentLast24Hours": reply.send_quota.sent_last_24_hours,
        },
        "SuppressionAttributes": {
            "SuppressedReasons": [
                name
                for value in suppression.suppressed_reasons
                if (name := enum_name(fb.SuppressionListReason, value, _REASON_PREFIX))
            ]
        },
    }
    if reply.HasField("details"):
        result["Details"] = without_none(
            {
                "MailType": enum_name(qb.MailType, details.mail_type, "MAIL_TYPE_"),
                "WebsiteURL": details.website_url or None,
                "ContactLanguage": enum_name(
                    qb.ContactLanguage, details.contact_language, "CONTACT_LANGUAGE_"
                ),
                "UseCaseDescription": details.use_case_description or None,
                "AdditionalContactEmailAddresses": list(details.additional_contact_email_addresses),
                "ReviewDetails": without_none(
                    {
                        "Status": enum_name(qb.ReviewStatus, details.review_details.status, "REVIEW_STATUS_"),
                        "CaseId": details.review_details.case_id or None,
                    }
                )
                if details.review_details.status
                else None,
            }
        )
    return without_none(result)


async def put_account_details(call: AccountCalls, req: V2Request) -> JSON:
    body = req.body
    await call(
        call.clients.quota.PutAccountDetails,
        qb.PutAccountDetailsRequest(
            mail_type=enum_value(qb.MailType, string(body, "MailType"), "MAIL_TYPE_", "MailType"),
            website_url=string(body, "WebsiteURL"),
            contact_language=enum_value(
                qb.ContactLanguage, string(body, "ContactLanguage"), "CONTACT_LANGUAGE_", "ContactLanguage"
            ),
            use_case_description=string(body, "UseCaseDescription"),
            additional_contact_email_addresses=strings(body, "AdditionalContactEmailAddresses"),
            production_access_enabled=bool(boolean(body, "ProductionAccessEnabled")),
        ),
    )
    return {}


async def _policies(call: AccountCalls, identity: str) -> dict[str, str]:
    reply = await call(
        call.clients.identity.GetEmailIdentityPolicies,
        ib.GetEmailIdentityPoliciesRequest(email_identity=identity),
    )
    return dict(reply.policies)


async def _put_policy(call: AccountCalls, req: V2Request) -> None:
    await call(
        call.clients.identity.PutEmailIdentityPolicy,
        ib.PutEmailIdentityPolicyRequest(
            email_identity=req.path["EmailIdentity"],
            policy_name=req.path["PolicyName"],
            policy=string(req.body, "Policy"),
        ),
    )


async def create_email_identity_policy(call: AccountCalls, req: V2Request) -> JSON:
    if req.path["PolicyName"] in await _policies(call, req.path["EmailIdentity"]):
        raise ApiError(ALREADY_EXISTS, f"Policy {req.path['PolicyName']} already exists.")
    await _put_policy(call, req)
    return {}


async def update_email_identity_policy(call: AccountCalls, req: V2Request) -> JSON:
    if req.path["PolicyName"] not in await _policies(call, req.path["EmailIdentity"]):
        raise ApiError(NOT_FOUND, f"Policy {req.path['PolicyName']} does not exist.")
    await _put_policy(call, req)
    return {}


async def get_email_identity_policies(call: AccountCalls, req: V2Request) -> JSON:
    return {"Policies": await _policies(call, req.path["EmailIdentity"])}


async def delete_email_identity_policy(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.identity.DeleteEmailIdentityPolicy,
        ib.DeleteEmailIdentityPolicyRequest(
            email_identity=req.path["EmailIdentity"], policy_name=req.path["PolicyName"]
        ),
    )
    return {}


def _dkim_signing_attributes(data: JSON) -> ib.DkimSigningAttributes:
    return ib.DkimSigningAttributes(
        domain_signing_selector=string(data, "DomainSigningSelector"),
        domain_signing_private_key=string(data, "DomainSigningPrivateKey"),
        next_signing_key_length=enum_value(
            ib.DkimSigningKeyLength,
            string(data, "NextSigningKeyLength"),
            "DKIM_SIGNING_KEY_LENGTH_",
            "NextSigningKeyLength",
        ),
    )


async def put_email_identity_dkim_signing_attributes(call: AccountCalls, req: V2Request) -> JSON:
    origin_text = string(req.body, "SigningAttributesOrigin")
    # SES's regional AWS_SES_<REGION> origins all mean "keys made by the service".
    origin = {
        "EXTERNAL": ib.DKIM_SIGNING_ATTRIBUTES_ORIGIN_EXTERNAL,
        "AWS_SES": ib.DKIM_SIGNING_ATTRIBUTES_ORIGIN_POSTMESH,
    }.get(
        origin_text,
        ib.DKIM_SIGNING_ATTRIBUTES_ORIGIN_POSTMESH if origin_text.startswith("AWS_SES_") else None,
    )
    if origin is None:
        raise ApiError(BAD_REQUEST, "SigningAttributesOrigin must be AWS_SES or EXTERNAL.")
    request = ib.PutEmailIdentityDkimSigningAttributesRequest(
        email_identity=req.path["EmailIdentity"], signing_attributes_origin=origin
    )
    if req.body.get("SigningAttributes") is not None:
        request.signing_attributes.CopyFrom(_dkim_signing_attributes(obj(req.body, "SigningAttributes")))
    reply = await call(call.clients.identity.PutEmailIdentityDkimSigningAttributes, request)
    return without_none(
        {
            "DkimStatus": enum_name(ib.VerificationStatus, reply.dkim_status, "VERIFICATION_STATUS_"),
            "DkimTokens": list(reply.dkim_tokens),
            "DnsRecords": _dns_records(reply.dns_records),
        }
    )


_REASON_PREFIX = "SUPPRESSION_LIST_REASON_"


def _reason(text: str) -> Any:
    return enum_value(fb.SuppressionListReason, text, _REASON_PREFIX, "Reason")


async def put_suppressed_destination(call: AccountCalls, req: V2Request) -> JSON:
    unsupported(req.body, "TenantName")
    await call(
        call.clients.feedback.PutSuppressedDestination,
        fb.PutSuppressedDestinationRequest(
            email_address=string(req.body, "EmailAddress"), reason=_reason(string(req.body, "Reason"))
        ),
    )
    return {}


async def get_suppressed_destination(call: AccountCalls, req: V2Request) -> JSON:
    reply = await call(
        call.clients.feedback.GetSuppressedDestination,
        fb.GetSuppressedDestinationRequest(email_address=req.path["EmailAddress"]),
    )
    found = reply.suppressed_destination
    return {
        "SuppressedDestination": without_none(
            {
                "EmailAddress": found.email_address,
                "Reason": enum_name(fb.SuppressionListReason, found.reason, _REASON_PREFIX),
                "LastUpdateTime": epoch(found.last_update_time),
                "Attributes": without_none(
                    {"MessageId": found.message_id or None, "FeedbackId": found.feedback_id or None}
                ),
            }
        )
    }


async def delete_suppressed_destination(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.feedback.DeleteSuppressedDestination,
        fb.DeleteSuppressedDestinationRequest(email_address=req.path["EmailAddress"]),
    )
    return {}


async def list_suppressed_destinations(call: AccountCalls, req: V2Request) -> JSON:
    request = fb.ListSuppressedDestinationsRequest(
        reasons=[_reason(r) for r in req.query.getall("Reason", [])],
        page_size=page_size(req.query),
        page_token=req.query.get("NextToken", ""),
    )
    if req.query.get("StartDate"):
        request.start_date.CopyFrom(parse_time(req.query["StartDate"], "StartDate"))
    if req.query.get("EndDate"):
        request.end_date.CopyFrom(parse_time(req.query["EndDate"], "EndDate"))
    reply = await call(call.clients.feedback.ListSuppressedDestinations, request)
    return without_none(
        {
            "SuppressedDestinationSummaries": [
                without_none(
                    {
                        "EmailAddress": s.email_address,
                        "Reason": enum_name(fb.SuppressionListReason, s.reason, _REASON_PREFIX),
                        "LastUpdateTime": epoch(s.last_update_time),
                    }
                )
                for s in reply.suppressed_destination_summaries
            ],
            "NextToken": reply.next_page_token or None,
        }
    )


async def put_account_sending_attributes(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.quota.PutAccountSendingAttributes,
        qb.PutAccountSendingAttributesRequest(sending_enabled=bool(boolean(req.body, "SendingEnabled"))),
    )
    return {}


async def put_account_suppression_attributes(call: AccountCalls, req: V2Request) -> JSON:
    unsupported(req.body, "ValidationAttributes")
    await call(
        call.clients.feedback.PutAccountSuppressionAttributes,
        fb.PutAccountSuppressionAttributesRequest(
            suppressed_reasons=[
                # An empty string is not a reason (enum_value would read it as "not given").
                enum_value(fb.SuppressionListReason, r or "''", _REASON_PREFIX, "SuppressedReasons")
                for r in dict.fromkeys(strings(req.body, "SuppressedReasons"))
            ]
        ),
    )
    return {}


async def put_email_identity_feedback_attributes(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.identity.PutEmailIdentityFeedbackAttributes,
        ib.PutEmailIdentityFeedbackAttributesRequest(
            email_identity=req.path["EmailIdentity"],
            email_forwarding_enabled=bool(boolean(req.body, "EmailForwardingEnabled")),
        ),
    )
    return {}


async def put_email_identity_configuration_set_attributes(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.identity.PutEmailIdentityConfigurationSetAttributes,
        ib.PutEmailIdentityConfigurationSetAttributesRequest(
            email_identity=req.path["EmailIdentity"],
            configuration_set_name=string(req.body, "ConfigurationSetName"),
        ),
    )
    return {}


def _insights_details(email: ev.EmailEvent) -> JSON | None:
    if email.event_type == ev.EMAIL_EVENT_TYPE_BOUNCE:
        bounce = email.bounce
        first = bounce.bounced_recipients[0] if bounce.bounced_recipients else ev.BouncedRecipient()
        sub_type = enum_name(ev.BounceSubType, bounce.bounce_sub_type, "BOUNCE_SUB_TYPE_") or ""
        return {
            "Bounce": without_none(
                {
                    "BounceType": enum_name(ev.BounceType, bounce.bounce_type, "BOUNCE_TYPE_"),
                    "BounceSubType": "".join(part.title() for part in sub_type.split("_")) or None,
                    "DiagnosticCode": first.diagnostic_code or None,
                }
            )
        }
    if email.event_type == ev.EMAIL_EVENT_TYPE_COMPLAINT:
        complaint = email.complaint
        return {
            "Complaint": without_none(
                {
                    "ComplaintSubType": complaint.complaint_sub_type or None,
                    "ComplaintFeedbackType": complaint.complaint_feedback_type or None,
                }
            )
        }
    return None


async def get_message_insights(call: AccountCalls, req: V2Request) -> JSON:
    reply = await call(
        call.clients.feedback.GetMessageInsights,
        fb.GetMessageInsightsRequest(message_id=req.path["MessageId"]),
    )
    by_recipient: dict[str, list[JSON]] = {}
    for event in reply.events:
        email = event.email
        entry = without_none(
            {
                "Timestamp": epoch(event.time),
                "Type": enum_name(ev.EmailEventType, email.event_type, "EMAIL_EVENT_TYPE_"),
                "Details": _insights_details(email),
            }
        )
        for recipient in event_recipients(email):
            by_recipient.setdefault(recipient, []).append(entry)
    return without_none(
        {
            "MessageId": reply.message_id,
            "FromEmailAddress": reply.from_email_address or None,
            "Subject": reply.subject or None,
            "EmailTags": [{"Name": t.name, "Value": t.value} for t in reply.email_tags],
            # SES also names the recipient's mailbox provider (Isp); postmesh does not guess it.
            "Insights": [
                {"Destination": recipient, "Events": events} for recipient, events in by_recipient.items()
            ],
        }
    )


def _template_content(data: JSON) -> sb.EmailTemplateContent:
    return sb.EmailTemplateContent(
        subject=string(data, "Subject"), text=string(data, "Text"), html=string(data, "Html")
    )


async def create_email_template(call: AccountCalls, req: V2Request) -> JSON:
    unsupported(req.body, "Tags")
    await call(
        call.clients.sender.CreateEmailTemplate,
        sb.CreateEmailTemplateRequest(
            template_name=string(req.body, "TemplateName"),
            template_content=_template_content(obj(req.body, "TemplateContent")),
        ),
    )
    return {}


async def get_email_template(call: AccountCalls, req: V2Request) -> JSON:
    reply = await call(
        call.clients.sender.GetEmailTemplate,
        sb.GetEmailTemplateRequest(template_name=req.path["TemplateName"]),
    )
    content = reply.template_content
    return {
        "TemplateName": reply.template_name,
        "TemplateContent": without_none(
            {"Subject": content.subject or None, "Text": content.text or None, "Html": content.html or None}
        ),
        "Tags": [],
    }


async def update_email_template(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.sender.UpdateEmailTemplate,
        sb.UpdateEmailTemplateRequest(
            template_name=req.path["TemplateName"],
            template_content=_template_content(obj(req.body, "TemplateContent")),
        ),
    )
    return {}


async def delete_email_template(call: AccountCalls, req: V2Request) -> JSON:
    await call(
        call.clients.sender.DeleteEmailTemplate,
        sb.DeleteEmailTemplateRequest(template_name=req.path["TemplateName"]),
    )
    return {}


async def list_email_templates(call: AccountCalls, req: V2Request) -> JSON:
    reply = await call(
        call.clients.sender.ListEmailTemplates,
        sb.ListEmailTemplatesRequest(
            page_size=page_size(req.query), page_token=req.query.get("NextToken", "")
        ),
    )
    return without_none(
        {
            "TemplatesMetadata": [
                without_none(
                    {"TemplateName": t.template_name, "CreatedTimestamp": epoch(t.created_timestamp)}
                )
                for t in reply.templates_metadata
            ],
            "NextToken": reply.next_page_token or None,
        }
    )


async def test_render_email_template(call: AccountCalls, req: V2Request) -> JSON:
    reply = await call(
        call.clients.sender.TestRenderEmailTemplate,
        sb.TestRenderEmailTemplateRequest(
            template_name=req.path["TemplateName"], template_data=string(req.body, "TemplateData")
        ),
    )
    return {"RenderedTemplate": reply.rendered_template}


# (method, path template, handler); path labels in braces, as in the sesv2 model's requestUri.
ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/v2/email/outbound-emails", send_email),
    ("POST", "/v2/email/outbound-bulk-emails", send_bulk_email),
    ("POST", "/v2/email/identities", create_email_identity),
    ("PUT", "/v2/email/identities/{EmailIdentity}/dkim", put_email_identity_dkim_attributes),
    ("PUT", "/v2/email/identities/{EmailIdentity}/mail-from", put_email_identity_mail_from_attributes),
    ("GET", "/v2/email/identities/{EmailIdentity}", get_email_identity),
    ("DELETE", "/v2/email/identities/{EmailIdentity}", delete_email_identity),
    ("POST", "/v2/email/list-identities", list_email_identities),
    ("GET", "/v2/email/identities", list_email_identities),
    ("GET", "/v2/email/account", get_account),
    ("POST", "/v2/email/account/details", put_account_details),
    ("PUT", "/v2/email/identities/{EmailIdentity}/dkim/signing", put_email_identity_dkim_signing_attributes),
    ("GET", "/v2/email/identities/{EmailIdentity}/policies", get_email_identity_policies),
    ("POST", "/v2/email/identities/{EmailIdentity}/policies/{PolicyName}", create_email_identity_policy),
    ("PUT", "/v2/email/identities/{EmailIdentity}/policies/{PolicyName}", update_email_identity_policy),
    ("DELETE", "/v2/email/identities/{EmailIdentity}/policies/{PolicyName}", delete_email_identity_policy),
    ("PUT", "/v2/email/suppression/addresses", put_suppressed_destination),
    ("GET", "/v2/email/suppression/addresses/{EmailAddress}", get_suppressed_destination),
    ("DELETE", "/v2/email/suppression/addresses/{EmailAddress}", delete_suppressed_destination),
    ("GET", "/v2/email/suppression/addresses", list_suppressed_destinations),
    ("POST", "/v2/email/templates", create_email_template),
    ("GET", "/v2/email/templates/{TemplateName}", get_email_template),
    ("PUT", "/v2/email/templates/{TemplateName}", update_email_template),
    ("DELETE", "/v2/email/templates/{TemplateName}", delete_email_template),
    ("GET", "/v2/email/templates", list_email_templates),
    ("POST", "/v2/email/templates/{TemplateName}/render", test_render_email_template),
    ("PUT", "/v2/email/account/sending", put_account_sending_attributes),
    ("PUT", "/v2/email/account/suppression", put_account_suppression_attributes),
    ("PUT", "/v2/email/identities/{EmailIdentity}/feedback", put_email_identity_feedback_attributes),
    (
        "PUT",
        "/v2/email/identities/{EmailIdentity}/configuration-set",
        put_email_identity_configuration_set_attributes,
    ),
    # The model's requestUri ends in "/"; paths are matched without their trailing slash.
    ("GET", "/v2/email/insights/{MessageId}", get_message_insights),
    *CONFIGURATION_SET_ROUTES,
]

_LABEL = re.compile(r"^\{(\w+)\}$")
UNKNOWN = "unknown"


def match(method: str, raw_path: str) -> tuple[Handler, dict[str, str]] | None:
    segments = raw_path.rstrip("/").split("/")
    for route_method, template, handler in ROUTES:
        parts = template.split("/")
        if route_method != method or len(parts) != len(segments):
            continue
        labels: dict[str, str] = {}
        for part, segment in zip(parts, segments, strict=True):
            label = _LABEL.match(part)
            if label:
                labels[label.group(1)] = unquote(segment)
            elif part != segment:
                break
        else:
            return handler, labels
    return None


def operation_name(method: str, raw_path: str) -> str:
    """The SES operation a request is for ("unknown" if none), as metrics label it."""
    found = match(method, raw_path)
    if found is None:
        return UNKNOWN
    return "".join(part.title() for part in found[0].__name__.split("_"))


def _body(body: bytes) -> JSON:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(SERIALIZATION, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(SERIALIZATION, "The request body must be a JSON object.")
    return data


async def dispatch(
    call: AccountCalls, request: web.Request, raw_path: str, body: bytes, request_id: str
) -> web.Response:
    found = match(request.method, raw_path)
    if found is None:
        raise ApiError(UNKNOWN_OPERATION, f"No SES v2 operation is {request.method} {raw_path[:200]}.")
    handler, labels = found
    result = await handler(call, V2Request(labels, request.query, _body(body)))
    return web.json_response(result, headers={"x-amzn-RequestId": request_id})


def error_response(error: ApiError, request_id: str) -> web.Response:
    return web.json_response(
        {"message": error.message},
        status=error.error.v2_status,
        headers={"x-amzn-ErrorType": error.error.v2_code, "x-amzn-RequestId": request_id},
    )
