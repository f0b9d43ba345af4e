"""SES v1 (the Query API: form-encoded `Action=...&Version=2010-12-01`, XML responses)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiMapping

from postmesh.common.xmltext import escape
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import configuration_sets_pb2 as cs
from postmesh.identity.v1 import identity_pb2 as ib
from postmesh.quota.v1 import quota_pb2 as qb
from postmesh.sender.v1 import queue_pb2 as qpb
from postmesh.sender.v1 import sender_pb2 as sb
from services.gateway.calls import AccountCalls
from services.gateway.errors import (
    ALREADY_EXISTS,
    BAD_REQUEST,
    CONFIGURATION_SET_ALREADY_EXISTS,
    CONFIGURATION_SET_DOES_NOT_EXIST,
    EVENT_DESTINATION_ALREADY_EXISTS,
    EVENT_DESTINATION_DOES_NOT_EXIST,
    NOT_FOUND,
    SERIALIZATION,
    TRACKING_OPTIONS_ALREADY_EXIST,
    TRACKING_OPTIONS_DO_NOT_EXIST,
    UNKNOWN_OPERATION,
    ApiError,
)
from services.gateway.shapes import iso
from services.gateway.v2_configsets import event_destination_definition

NAMESPACE = "http://ses.amazonaws.com/doc/2010-12-01/"
VERSION = "2010-12-01"

Form = dict[str, str]
Action = Callable[[AccountCalls, Form], Awaitable[str]]


def parse_form(body: bytes) -> Form:
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body), errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        raise ApiError(
            SERIALIZATION, "The request body is not form-encoded (application/x-www-form-urlencoded)."
        ) from None
    return dict(pairs)


def members(form: Form, prefix: str) -> list[str]:
    """`Prefix.member.1`, `Prefix.member.2`, ... in order."""
    pattern = re.compile(re.escape(prefix) + r"\.member\.(\d{1,4})$")
    found = sorted((int(m.group(1)), v) for k, v in form.items() if (m := pattern.match(k)))
    return [v for _, v in found]


def _member_indexes(form: Form, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"\.member\.(\d{1,4})\.")
    return sorted({int(m.group(1)) for k in form if (m := pattern.match(k))})


def _tags(form: Form, prefix: str = "Tags") -> list[sb.MessageTag]:
    return [
        sb.MessageTag(
            name=form.get(f"{prefix}.member.{i}.Name", ""), value=form.get(f"{prefix}.member.{i}.Value", "")
        )
        for i in _member_indexes(form, prefix)
    ]


def _destination(form: Form, prefix: str = "Destination") -> sb.Destination:
    return sb.Destination(
        to_addresses=members(form, f"{prefix}.ToAddresses"),
        cc_addresses=members(form, f"{prefix}.CcAddresses"),
        bcc_addresses=members(form, f"{prefix}.BccAddresses"),
    )


def _content(form: Form, prefix: str) -> sb.Content:
    return sb.Content(data=form.get(f"{prefix}.Data", ""), charset=form.get(f"{prefix}.Charset", ""))


def _send_request(form: Form, content: sb.EmailContent) -> sb.SendEmailRequest:
    return sb.SendEmailRequest(
        from_email_address=form.get("Source", ""),
        from_email_address_identity_arn=form.get("SourceArn", "") or form.get("FromArn", ""),
        reply_to_addresses=members(form, "ReplyToAddresses"),
        feedback_forwarding_email_address=form.get("ReturnPath", ""),
        feedback_forwarding_email_address_identity_arn=form.get("ReturnPathArn", ""),
        content=content,
        email_tags=_tags(form),
        configuration_set_name=form.get("ConfigurationSetName", ""),
    )


def _message_id(message_id: str) -> str:
    return f"<MessageId>{escape(message_id)}</MessageId>"


async def send_email(call: AccountCalls, form: Form) -> str:
    message = sb.Message(subject=_content(form, "Message.Subject"))
    if "Message.Body.Text.Data" in form:
        message.body.text.CopyFrom(_content(form, "Message.Body.Text"))
    if "Message.Body.Html.Data" in form:
        message.body.html.CopyFrom(_content(form, "Message.Body.Html"))
    request = _send_request(form, sb.EmailContent(simple=message))
    request.destination.CopyFrom(_destination(form))
    return _message_id((await call(call.clients.sender.SendEmail, request)).message_id)


async def send_raw_email(call: AccountCalls, form: Form) -> str:
    try:
        data = base64.b64decode(form.get("RawMessage.Data", ""), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(SERIALIZATION, "RawMessage.Data must be base64-encoded.") from None
    request = _send_request(form, sb.EmailContent(raw=sb.RawMessage(data=data)))
    destinations = members(form, "Destinations")
    if destinations:
        request.destination.CopyFrom(sb.Destination(to_addresses=destinations))
    return _message_id((await call(call.clients.sender.SendEmail, request)).message_id)


async def send_templated_email(call: AccountCalls, form: Form) -> str:
    name = form.get("Template", "") or form.get("TemplateArn", "").rpartition("/")[2]
    template = sb.Template(template_name=name, template_data=form.get("TemplateData", ""))
    request = _send_request(form, sb.EmailContent(template=template))
    request.destination.CopyFrom(_destination(form))
    return _message_id((await call(call.clients.sender.SendEmail, request)).message_id)


async def get_send_quota(call: AccountCalls, form: Form) -> str:
    quota = (await call(call.clients.quota.GetAccount, qb.GetAccountRequest())).send_quota
    return (
        f"<Max24HourSend>{quota.max_24_hour_send}</Max24HourSend>"
        f"<MaxSendRate>{quota.max_send_rate}</MaxSendRate>"
        f"<SentLast24Hours>{quota.sent_last_24_hours}</SentLast24Hours>"
    )


async def get_send_statistics(call: AccountCalls, form: Form) -> str:
    reply = await call(call.clients.quota.GetSendStatistics, qb.GetSendStatisticsRequest())
    points = "".join(
        "<member>"
        f"<Timestamp>{iso(p.timestamp)}</Timestamp>"
        f"<DeliveryAttempts>{p.delivery_attempts}</DeliveryAttempts>"
        f"<Bounces>{p.bounces}</Bounces><Complaints>{p.complaints}</Complaints><Rejects>{p.rejects}</Rejects>"
        "</member>"
        for p in reply.send_data_points
    )
    return f"<SendDataPoints>{points}</SendDataPoints>"


async def _create_identity(call: AccountCalls, name: str) -> None:
    try:
        await call(
            call.clients.identity.CreateEmailIdentity, ib.CreateEmailIdentityRequest(email_identity=name)
        )
    except ApiError as exc:
        # SES v1's Verify* calls are idempotent: verifying an identity again is not an error.
        if exc.error is not ALREADY_EXISTS:
            raise


def _verification_token(identity: ib.GetEmailIdentityResponse) -> str:
    return next((r.value for r in identity.dns_records if r.purpose == "verification"), "")


async def verify_email_identity(call: AccountCalls, form: Form) -> str:
    await _create_identity(call, form.get("EmailAddress", ""))
    return ""


async def verify_domain_identity(call: AccountCalls, form: Form) -> str:
    domain = form.get("Domain", "")
    await _create_identity(call, domain)
    identity = await call(
        call.clients.identity.GetEmailIdentity, ib.GetEmailIdentityRequest(email_identity=domain)
    )
    return f"<VerificationToken>{escape(_verification_token(identity))}</VerificationToken>"


async def verify_domain_dkim(call: AccountCalls, form: Form) -> str:
    domain = form.get("Domain", "")
    await _create_identity(call, domain)
    identity = await call(
        call.clients.identity.GetEmailIdentity, ib.GetEmailIdentityRequest(email_identity=domain)
    )
    tokens = "".join(f"<member>{escape(t)}</member>" for t in identity.dkim_attributes.tokens)
    return f"<DkimTokens>{tokens}</DkimTokens>"


def _max_items(form: Form) -> int:
    max_items = form.get("MaxItems", "")
    if max_items and (not max_items.isdigit() or len(max_items) > 9):
        raise ApiError(SERIALIZATION, "MaxItems must be a non-negative integer.")
    return int(max_items or 0)


_IDENTITY_TYPES = {"EmailAddress": ib.IDENTITY_TYPE_EMAIL_ADDRESS, "Domain": ib.IDENTITY_TYPE_DOMAIN}


async def list_identities(call: AccountCalls, form: Form) -> str:
    wanted = form.get("IdentityType", "")
    if wanted and wanted not in _IDENTITY_TYPES:
        raise ApiError(SERIALIZATION, "IdentityType must be EmailAddress or Domain.")
    reply = await call(
        call.clients.identity.ListEmailIdentities,
        ib.ListEmailIdentitiesRequest(page_size=_max_items(form), page_token=form.get("NextToken", "")),
    )
    names = [
        i.identity_name
        for i in reply.email_identities
        if not wanted or i.identity_type == _IDENTITY_TYPES[wanted]
    ]
    listed = "".join(f"<member>{escape(n)}</member>" for n in names)
    token = f"<NextToken>{escape(reply.next_page_token)}</NextToken>" if reply.next_page_token else ""
    return f"<Identities>{listed}</Identities>{token}"


async def delete_identity(call: AccountCalls, form: Form) -> str:
    try:
        await call(
            call.clients.identity.DeleteEmailIdentity,
            ib.DeleteEmailIdentityRequest(email_identity=form.get("Identity", "")),
        )
    except ApiError as exc:
        if exc.error is not NOT_FOUND:  # SES: deleting an identity that is not there succeeds
            raise
    return ""


_V1_STATUS = {
    ib.VERIFICATION_STATUS_PENDING: "Pending",
    ib.VERIFICATION_STATUS_SUCCESS: "Success",
    ib.VERIFICATION_STATUS_FAILED: "Failed",
    ib.VERIFICATION_STATUS_TEMPORARY_FAILURE: "TemporaryFailure",
    ib.VERIFICATION_STATUS_NOT_STARTED: "NotStarted",
}


async def get_identity_verification_attributes(call: AccountCalls, form: Form) -> str:
    entries = []
    for name, identity in await _existing_identities(call, form):
        token = ""
        if identity.identity_type == ib.IDENTITY_TYPE_DOMAIN:
            token = f"<VerificationToken>{escape(_verification_token(identity))}</VerificationToken>"
        status = _V1_STATUS.get(identity.verification_status, "NotStarted")
        entries.append(
            f"<entry><key>{escape(name)}</key><value><VerificationStatus>{status}</VerificationStatus>"
            f"{token}</value></entry>"
        )
    return f"<VerificationAttributes>{''.join(entries)}</VerificationAttributes>"


# --- templates


def _template_fields(form: Form) -> tuple[str, sb.EmailTemplateContent]:
    return form.get("Template.TemplateName", ""), sb.EmailTemplateContent(
        subject=form.get("Template.SubjectPart", ""),
        text=form.get("Template.TextPart", ""),
        html=form.get("Template.HtmlPart", ""),
    )


async def create_template(call: AccountCalls, form: Form) -> str:
    name, content = _template_fields(form)
    await call(
        call.clients.sender.CreateEmailTemplate,
        sb.CreateEmailTemplateRequest(template_name=name, template_content=content),
    )
    return ""


async def update_template(call: AccountCalls, form: Form) -> str:
    name, content = _template_fields(form)
    await call(
        call.clients.sender.UpdateEmailTemplate,
        sb.UpdateEmailTemplateRequest(template_name=name, template_content=content),
    )
    return ""


async def get_template(call: AccountCalls, form: Form) -> str:
    reply = await call(
        call.clients.sender.GetEmailTemplate,
        sb.GetEmailTemplateRequest(template_name=form.get("TemplateName", "")),
    )
    content = reply.template_content
    parts = "".join(
        f"<{tag}>{escape(value)}</{tag}>"
        for tag, value in (
            ("SubjectPart", content.subject),
            ("TextPart", content.text),
            ("HtmlPart", content.html),
        )
        if value
    )
    return f"<Template><TemplateName>{escape(reply.template_name)}</TemplateName>{parts}</Template>"


async def delete_template(call: AccountCalls, form: Form) -> str:
    try:
        await call(
            call.clients.sender.DeleteEmailTemplate,
            sb.DeleteEmailTemplateRequest(template_name=form.get("TemplateName", "")),
        )
    except ApiError as exc:
        if exc.error.v1_code != "TemplateDoesNotExist" and exc.error is not NOT_FOUND:
            raise  # SES: deleting a template that is not there succeeds
    return ""


async def list_templates(call: AccountCalls, form: Form) -> str:
    reply = await call(
        call.clients.sender.ListEmailTemplates,
        sb.ListEmailTemplatesRequest(page_size=_max_items(form), page_token=form.get("NextToken", "")),
    )
    listed = "".join(
        f"<member><Name>{escape(t.template_name)}</Name>"
        f"<CreatedTimestamp>{iso(t.created_timestamp)}</CreatedTimestamp></member>"
        for t in reply.templates_metadata
    )
    token = f"<NextToken>{escape(reply.next_page_token)}</NextToken>" if reply.next_page_token else ""
    return f"<TemplatesMetadata>{listed}</TemplatesMetadata>{token}"


async def test_render_template(call: AccountCalls, form: Form) -> str:
    reply = await call(
        call.clients.sender.TestRenderEmailTemplate,
        sb.TestRenderEmailTemplateRequest(
            template_name=form.get("TemplateName", ""), template_data=form.get("TemplateData", "")
        ),
    )
    return f"<RenderedTemplate>{escape(reply.rendered_template)}</RenderedTemplate>"


_V1_BULK_STATUS = {
    sb.BULK_EMAIL_STATUS_SUCCESS: "Success",
    sb.BULK_EMAIL_STATUS_MESSAGE_REJECTED: "MessageRejected",
    sb.BULK_EMAIL_STATUS_MAIL_FROM_DOMAIN_NOT_VERIFIED: "MailFromDomainNotVerified",
    sb.BULK_EMAIL_STATUS_ACCOUNT_SENDING_PAUSED: "AccountSendingPaused",
    sb.BULK_EMAIL_STATUS_ACCOUNT_THROTTLED: "AccountThrottled",
    sb.BULK_EMAIL_STATUS_ACCOUNT_DAILY_QUOTA_EXCEEDED: "AccountDailyQuotaExceeded",
    sb.BULK_EMAIL_STATUS_INVALID_PARAMETER: "InvalidParameterValue",
    sb.BULK_EMAIL_STATUS_TRANSIENT_FAILURE: "TransientFailure",
    sb.BULK_EMAIL_STATUS_FAILED: "Failed",
}


async def send_bulk_templated_email(call: AccountCalls, form: Form) -> str:
    name = form.get("Template", "") or form.get("TemplateArn", "").rpartition("/")[2]
    entries = []
    for i in _member_indexes(form, "Destinations"):
        prefix = f"Destinations.member.{i}"
        entry = sb.BulkEmailEntry(
            replacement_tags=[
                sb.MessageTag(
                    name=form.get(f"{prefix}.ReplacementTags.member.{j}.Name", ""),
                    value=form.get(f"{prefix}.ReplacementTags.member.{j}.Value", ""),
                )
                for j in _member_indexes(form, f"{prefix}.ReplacementTags")
            ],
        )
        entry.destination.CopyFrom(_destination(form, f"{prefix}.Destination"))
        if f"{prefix}.ReplacementTemplateData" in form:
            entry.replacement_email_content.replacement_template.replacement_template_data = form[
                f"{prefix}.ReplacementTemplateData"
            ]
        entries.append(entry)
    request = sb.SendBulkEmailRequest(
        from_email_address=form.get("Source", ""),
        from_email_address_identity_arn=form.get("SourceArn", ""),
        reply_to_addresses=members(form, "ReplyToAddresses"),
        feedback_forwarding_email_address=form.get("ReturnPath", ""),
        feedback_forwarding_email_address_identity_arn=form.get("ReturnPathArn", ""),
        default_email_tags=_tags(form, "DefaultTags"),
        default_content=sb.BulkEmailContent(
            template=sb.Template(template_name=name, template_data=form.get("DefaultTemplateData", ""))
        ),
        bulk_email_entries=entries,
        configuration_set_name=form.get("ConfigurationSetName", ""),
    )
    reply = await call(call.clients.sender.SendBulkEmail, request)
    statuses = "".join(
        f"<member><Status>{_V1_BULK_STATUS.get(r.status, 'Failed')}</Status>"
        + (f"<Error>{escape(r.error)}</Error>" if r.error else "")
        + (f"<MessageId>{escape(r.message_id)}</MessageId>" if r.message_id else "")
        + "</member>"
        for r in reply.bulk_email_entry_results
    )
    return f"<Status>{statuses}</Status>"


async def get_account_sending_enabled(call: AccountCalls, form: Form) -> str:
    reply = await call(call.clients.quota.GetAccount, qb.GetAccountRequest())
    return f"<Enabled>{'true' if reply.sending_enabled else 'false'}</Enabled>"


async def update_account_sending_enabled(call: AccountCalls, form: Form) -> str:
    # As in SES, leaving out Enabled disables sending.
    enabled = _boolean(form, "Enabled") if "Enabled" in form else False
    await call(
        call.clients.quota.PutAccountSendingAttributes,
        qb.PutAccountSendingAttributesRequest(sending_enabled=enabled),
    )
    return ""


# --- identity attributes


async def _existing_identities(
    call: AccountCalls, form: Form
) -> list[tuple[str, ib.GetEmailIdentityResponse]]:
    found = []
    for name in members(form, "Identities")[:100]:
        try:
            identity = await call(
                call.clients.identity.GetEmailIdentity, ib.GetEmailIdentityRequest(email_identity=name)
            )
        except ApiError as exc:
            if exc.error is NOT_FOUND:  # SES leaves out identities that do not exist
                continue
            raise
        found.append((name, identity))
    return found


def _boolean(form: Form, name: str) -> bool:
    value = form.get(name, "").lower()
    if value not in ("true", "false"):
        raise ApiError(SERIALIZATION, f"{name} must be true or false.")
    return value == "true"


async def get_identity_dkim_attributes(call: AccountCalls, form: Form) -> str:
    entries = []
    for name, identity in await _existing_identities(call, form):
        dkim = identity.dkim_attributes
        tokens = "".join(f"<member>{escape(t)}</member>" for t in dkim.tokens)
        entries.append(
            f"<entry><key>{escape(name)}</key><value>"
            f"<DkimEnabled>{'true' if dkim.signing_enabled else 'false'}</DkimEnabled>"
            f"<DkimVerificationStatus>{_V1_STATUS.get(dkim.status, 'NotStarted')}</DkimVerificationStatus>"
            f"<DkimTokens>{tokens}</DkimTokens></value></entry>"
        )
    return f"<DkimAttributes>{''.join(entries)}</DkimAttributes>"


async def set_identity_dkim_enabled(call: AccountCalls, form: Form) -> str:
    await call(
        call.clients.identity.PutEmailIdentityDkimAttributes,
        ib.PutEmailIdentityDkimAttributesRequest(
            email_identity=form.get("Identity", ""), signing_enabled=_boolean(form, "DkimEnabled")
        ),
    )
    return ""


_MX_FAILURE = {
    "UseDefaultValue": ib.BEHAVIOR_ON_MX_FAILURE_USE_DEFAULT_VALUE,
    "RejectMessage": ib.BEHAVIOR_ON_MX_FAILURE_REJECT_MESSAGE,
}
_MAIL_FROM_STATUS = {
    ib.MAIL_FROM_DOMAIN_STATUS_PENDING: "Pending",
    ib.MAIL_FROM_DOMAIN_STATUS_SUCCESS: "Success",
    ib.MAIL_FROM_DOMAIN_STATUS_FAILED: "Failed",
    ib.MAIL_FROM_DOMAIN_STATUS_TEMPORARY_FAILURE: "TemporaryFailure",
}


async def get_identity_mail_from_domain_attributes(call: AccountCalls, form: Form) -> str:
    entries = []
    for name, identity in await _existing_identities(call, form):
        mail_from = identity.mail_from_attributes
        behavior = next(
            (k for k, v in _MX_FAILURE.items() if v == mail_from.behavior_on_mx_failure), "UseDefaultValue"
        )
        domain = ""
        if mail_from.mail_from_domain:
            status = _MAIL_FROM_STATUS.get(mail_from.mail_from_domain_status, "Pending")
            domain = (
                f"<MailFromDomain>{escape(mail_from.mail_from_domain)}</MailFromDomain>"
                f"<MailFromDomainStatus>{status}</MailFromDomainStatus>"
            )
        entries.append(
            f"<entry><key>{escape(name)}</key><value>{domain}"
            f"<BehaviorOnMXFailure>{behavior}</BehaviorOnMXFailure></value></entry>"
        )
    return f"<MailFromDomainAttributes>{''.join(entries)}</MailFromDomainAttributes>"


async def set_identity_mail_from_domain(call: AccountCalls, form: Form) -> str:
    behavior = form.get("BehaviorOnMXFailure", "")
    if behavior and behavior not in _MX_FAILURE:
        raise ApiError(SERIALIZATION, "BehaviorOnMXFailure must be UseDefaultValue or RejectMessage.")
    await call(
        call.clients.identity.PutEmailIdentityMailFromAttributes,
        ib.PutEmailIdentityMailFromAttributesRequest(
            email_identity=form.get("Identity", ""),
            mail_from_domain=form.get("MailFromDomain", ""),
            behavior_on_mx_failure=_MX_FAILURE.get(behavior, ib.BEHAVIOR_ON_MX_FAILURE_UNSPECIFIED),
        ),
    )
    return ""


# --- sending authorization policies


async def _identity_policies(call: AccountCalls, identity: str) -> dict[str, str]:
    reply = await call(
        call.clients.identity.GetEmailIdentityPolicies,
        ib.GetEmailIdentityPoliciesRequest(email_identity=identity),
    )
    return dict(reply.policies)


async def put_identity_policy(call: AccountCalls, form: Form) -> str:
    await call(
        call.clients.identity.PutEmailIdentityPolicy,
        ib.PutEmailIdentityPolicyRequest(
            email_identity=form.get("Identity", ""),
            policy_name=form.get("PolicyName", ""),
            policy=form.get("Policy", ""),
        ),
    )
    return ""


async def get_identity_policies(call: AccountCalls, form: Form) -> str:
    policies = await _identity_policies(call, form.get("Identity", ""))
    wanted = members(form, "PolicyNames")
    entries = "".join(
        f"<entry><key>{escape(name)}</key><value>{escape(policy)}</value></entry>"
        for name, policy in sorted(policies.items())
        if name in wanted
    )
    return f"<Policies>{entries}</Policies>"


async def list_identity_policies(call: AccountCalls, form: Form) -> str:
    policies = await _identity_policies(call, form.get("Identity", ""))
    return f"<PolicyNames>{''.join(f'<member>{escape(n)}</member>' for n in sorted(policies))}</PolicyNames>"


async def delete_identity_policy(call: AccountCalls, form: Form) -> str:
    await call(
        call.clients.identity.DeleteEmailIdentityPolicy,
        ib.DeleteEmailIdentityPolicyRequest(
            email_identity=form.get("Identity", ""), policy_name=form.get("PolicyName", "")
        ),
    )
    return ""


async def list_verified_email_addresses(call: AccountCalls, form: Form) -> str:
    addresses: list[str] = []
    token = ""
    while True:  # the old API has no paging: every verified address at once
        reply = await call(
            call.clients.identity.ListEmailIdentities,
            ib.ListEmailIdentitiesRequest(page_size=1000, page_token=token),
        )
        addresses += [
            i.identity_name
            for i in reply.email_identities
            if i.identity_type == ib.IDENTITY_TYPE_EMAIL_ADDRESS
            and i.verification_status == ib.VERIFICATION_STATUS_SUCCESS
        ]
        token = reply.next_page_token
        if not token:
            break
    listed = "".join(f"<member>{escape(a)}</member>" for a in addresses)
    return f"<VerifiedEmailAddresses>{listed}</VerifiedEmailAddresses>"


async def delete_verified_email_address(call: AccountCalls, form: Form) -> str:
    return await delete_identity(call, {"Identity": form.get("EmailAddress", "")})


# --- identity notifications (SES v1): the "topic" is an event destination, "<set>/<destination>"

_NOTIFICATION_TYPES = {
    "Bounce": ib.NOTIFICATION_TYPE_BOUNCE,
    "Complaint": ib.NOTIFICATION_TYPE_COMPLAINT,
    "Delivery": ib.NOTIFICATION_TYPE_DELIVERY,
}


def _notification_type(form: Form) -> ib.NotificationType.ValueType:
    text = form.get("NotificationType", "")
    if text not in _NOTIFICATION_TYPES:
        raise ApiError(BAD_REQUEST, "NotificationType must be Bounce, Complaint or Delivery.")
    return _NOTIFICATION_TYPES[text]


async def set_identity_notification_topic(call: AccountCalls, form: Form) -> str:
    await call(
        call.clients.identity.SetIdentityNotificationTopic,
        ib.SetIdentityNotificationTopicRequest(
            identity=form.get("Identity", ""),
            notification_type=_notification_type(form),
            destination=form.get("SnsTopic", ""),
        ),
    )
    return ""


async def set_identity_headers_in_notifications_enabled(call: AccountCalls, form: Form) -> str:
    await call(
        call.clients.identity.SetIdentityHeadersInNotificationsEnabled,
        ib.SetIdentityHeadersInNotificationsEnabledRequest(
            identity=form.get("Identity", ""),
            notification_type=_notification_type(form),
            enabled=_boolean(form, "Enabled"),
        ),
    )
    return ""


async def set_identity_feedback_forwarding_enabled(call: AccountCalls, form: Form) -> str:
    await call(
        call.clients.identity.SetIdentityFeedbackForwardingEnabled,
        ib.SetIdentityFeedbackForwardingEnabledRequest(
            identity=form.get("Identity", ""), forwarding_enabled=_boolean(form, "ForwardingEnabled")
        ),
    )
    return ""


def _flag(value: bool) -> str:
    return "true" if value else "false"


async def get_identity_notification_attributes(call: AccountCalls, form: Form) -> str:
    names = members(form, "Identities")[:100]
    reply = await call(
        call.clients.identity.GetIdentityNotificationAttributes,
        ib.GetIdentityNotificationAttributesRequest(identities=names),
    )
    entries = []
    for name in names:
        if name not in reply.notification_attributes:
            continue  # SES leaves out identities that do not exist
        found = reply.notification_attributes[name]
        topics = "".join(
            f"<{tag}>{escape(value)}</{tag}>"
            for tag, value in (
                ("BounceTopic", found.bounce_destination),
                ("ComplaintTopic", found.complaint_destination),
                ("DeliveryTopic", found.delivery_destination),
            )
            if value
        )
        entries.append(
            f"<entry><key>{escape(name)}</key><value>{topics}"
            f"<ForwardingEnabled>{_flag(found.forwarding_enabled)}</ForwardingEnabled>"
            "<HeadersInBounceNotificationsEnabled>"
            f"{_flag(found.headers_in_bounce_notifications_enabled)}</HeadersInBounceNotificationsEnabled>"
            "<HeadersInComplaintNotificationsEnabled>"
            f"{_flag(found.headers_in_complaint_notifications_enabled)}"
            "</HeadersInComplaintNotificationsEnabled>"
            "<HeadersInDeliveryNotificationsEnabled>"
            f"{_flag(found.headers_in_delivery_notifications_enabled)}"
            "</HeadersInDeliveryNotificationsEnabled></value></entry>"
        )
    return f"<NotificationAttributes>{''.join(entries)}</NotificationAttributes>"


# --- configuration sets (SES v1's names for the same feedback RPCs as v2's)

_V1_EVENT_TYPES = {
    "send": "SEND",
    "reject": "REJECT",
    "bounce": "BOUNCE",
    "complaint": "COMPLAINT",
    "delivery": "DELIVERY",
    "open": "OPEN",
    "click": "CLICK",
    "renderingFailure": "RENDERING_FAILURE",
}
_V1_EVENT_NAMES = {
    getattr(ev, f"EMAIL_EVENT_TYPE_{upper}"): lower for lower, upper in _V1_EVENT_TYPES.items()
}
_V1_TLS = {qpb.TLS_POLICY_REQUIRE: "Require", qpb.TLS_POLICY_OPTIONAL: "Optional"}


async def _set_call(call: AccountCalls, method: Any, request: Any) -> Any:
    """A call about one configuration set: its absence or presence in v1's own codes."""
    try:
        return await call(method, request)
    except ApiError as exc:
        if exc.error is NOT_FOUND:
            raise ApiError(CONFIGURATION_SET_DOES_NOT_EXIST, exc.message) from None
        if exc.error is ALREADY_EXISTS:
            raise ApiError(CONFIGURATION_SET_ALREADY_EXISTS, exc.message) from None
        raise


async def create_configuration_set(call: AccountCalls, form: Form) -> str:
    await _set_call(
        call,
        call.clients.feedback.CreateConfigurationSet,
        cs.CreateConfigurationSetRequest(configuration_set_name=form.get("ConfigurationSet.Name", "")),
    )
    return ""


async def delete_configuration_set(call: AccountCalls, form: Form) -> str:
    await _set_call(
        call,
        call.clients.feedback.DeleteConfigurationSet,
        cs.DeleteConfigurationSetRequest(configuration_set_name=form.get("ConfigurationSetName", "")),
    )
    return ""


async def update_configuration_set_sending_enabled(call: AccountCalls, form: Form) -> str:
    await _set_call(
        call,
        call.clients.feedback.PutConfigurationSetSendingOptions,
        cs.PutConfigurationSetSendingOptionsRequest(
            configuration_set_name=form.get("ConfigurationSetName", ""),
            sending_enabled=_boolean(form, "Enabled"),
        ),
    )
    return ""


async def list_configuration_sets(call: AccountCalls, form: Form) -> str:
    reply = await call(
        call.clients.feedback.ListConfigurationSets,
        cs.ListConfigurationSetsRequest(page_size=_max_items(form), page_token=form.get("NextToken", "")),
    )
    names = "".join(f"<member><Name>{escape(n)}</Name></member>" for n in reply.configuration_sets)
    token = f"<NextToken>{escape(reply.next_page_token)}</NextToken>" if reply.next_page_token else ""
    return f"<ConfigurationSets>{names}</ConfigurationSets>{token}"


async def update_configuration_set_reputation_metrics_enabled(call: AccountCalls, form: Form) -> str:
    await _set_call(
        call,
        call.clients.feedback.PutConfigurationSetReputationOptions,
        cs.PutConfigurationSetReputationOptionsRequest(
            configuration_set_name=form.get("ConfigurationSetName", ""),
            reputation_metrics_enabled=_boolean(form, "Enabled"),
        ),
    )
    return ""


async def _configuration_set(call: AccountCalls, name: str) -> cs.ConfigurationSet:
    reply = await _set_call(
        call,
        call.clients.feedback.GetConfigurationSet,
        cs.GetConfigurationSetRequest(configuration_set_name=name),
    )
    found: cs.ConfigurationSet = reply.configuration_set
    return found


async def put_configuration_set_delivery_options(call: AccountCalls, form: Form) -> str:
    name = form.get("ConfigurationSetName", "")
    text = form.get("DeliveryOptions.TlsPolicy", "Optional")
    tls = {label: value for value, label in _V1_TLS.items()}.get(text)
    if tls is None:
        raise ApiError(BAD_REQUEST, "DeliveryOptions.TlsPolicy must be Require or Optional.")
    # v1 has no MaxDeliverySeconds: the set keeps its own.
    kept = (await _configuration_set(call, name)).delivery_options.max_delivery_seconds
    await _set_call(
        call,
        call.clients.feedback.PutConfigurationSetDeliveryOptions,
        cs.PutConfigurationSetDeliveryOptionsRequest(
            configuration_set_name=name, tls_policy=tls, max_delivery_seconds=kept
        ),
    )
    return ""


async def _put_tracking(call: AccountCalls, name: str, domain: str) -> None:
    await _set_call(
        call,
        call.clients.feedback.PutConfigurationSetTrackingOptions,
        cs.PutConfigurationSetTrackingOptionsRequest(
            configuration_set_name=name, custom_redirect_domain=domain
        ),
    )


async def create_configuration_set_tracking_options(call: AccountCalls, form: Form) -> str:
    name = form.get("ConfigurationSetName", "")
    if (await _configuration_set(call, name)).tracking_options.custom_redirect_domain:
        raise ApiError(TRACKING_OPTIONS_ALREADY_EXIST, f"Configuration set {name} has tracking options.")
    domain = form.get("TrackingOptions.CustomRedirectDomain", "")
    if not domain:
        raise ApiError(BAD_REQUEST, "TrackingOptions.CustomRedirectDomain is required.")
    await _put_tracking(call, name, domain)
    return ""


async def update_configuration_set_tracking_options(call: AccountCalls, form: Form) -> str:
    name = form.get("ConfigurationSetName", "")
    if not (await _configuration_set(call, name)).tracking_options.custom_redirect_domain:
        raise ApiError(TRACKING_OPTIONS_DO_NOT_EXIST, f"Configuration set {name} has no tracking options.")
    domain = form.get("TrackingOptions.CustomRedirectDomain", "")
    if not domain:
        raise ApiError(BAD_REQUEST, "TrackingOptions.CustomRedirectDomain is required.")
    await _put_tracking(call, name, domain)
    return ""


async def delete_configuration_set_tracking_options(call: AccountCalls, form: Form) -> str:
    name = form.get("ConfigurationSetName", "")
    if not (await _configuration_set(call, name)).tracking_options.custom_redirect_domain:
        raise ApiError(TRACKING_OPTIONS_DO_NOT_EXIST, f"Configuration set {name} has no tracking options.")
    await _put_tracking(call, name, "")
    return ""


def _v1_destination(found: cs.EventDestination) -> str:
    types = "".join(
        f"<member>{_V1_EVENT_NAMES[t]}</member>" for t in found.matching_event_types if t in _V1_EVENT_NAMES
    )
    sns = ""
    if found.WhichOneof("target") == "webhook" and found.webhook.format == cs.WEBHOOK_FORMAT_SNS:
        sns = f"<SNSDestination><TopicARN>{escape(found.webhook.url)}</TopicARN></SNSDestination>"
    return (
        f"<member><Name>{escape(found.name)}</Name><Enabled>{_flag(found.enabled)}</Enabled>"
        f"<MatchingEventTypes>{types}</MatchingEventTypes>{sns}</member>"
    )


async def describe_configuration_set(call: AccountCalls, form: Form) -> str:
    name = form.get("ConfigurationSetName", "")
    found = await _configuration_set(call, name)
    wanted = set(members(form, "ConfigurationSetAttributeNames"))
    parts = [f"<ConfigurationSet><Name>{escape(found.configuration_set_name)}</Name></ConfigurationSet>"]
    if "eventDestinations" in wanted:
        destinations = await _set_call(
            call,
            call.clients.feedback.GetConfigurationSetEventDestinations,
            cs.GetConfigurationSetEventDestinationsRequest(configuration_set_name=name),
        )
        listed = "".join(_v1_destination(d) for d in destinations.event_destinations)
        parts.append(f"<EventDestinations>{listed}</EventDestinations>")
    if "trackingOptions" in wanted and found.tracking_options.custom_redirect_domain:
        domain = escape(found.tracking_options.custom_redirect_domain)
        parts.append(
            f"<TrackingOptions><CustomRedirectDomain>{domain}</CustomRedirectDomain></TrackingOptions>"
        )
    if "deliveryOptions" in wanted:
        tls = _V1_TLS.get(found.delivery_options.tls_policy, "Optional")
        parts.append(f"<DeliveryOptions><TlsPolicy>{tls}</TlsPolicy></DeliveryOptions>")
    if "reputationOptions" in wanted:
        reputation = found.reputation_options
        fresh = reputation.last_fresh_start
        parts.append(
            f"<ReputationOptions><SendingEnabled>{_flag(found.sending_options.sending_enabled)}</SendingEnabled>"
            f"<ReputationMetricsEnabled>{_flag(reputation.reputation_metrics_enabled)}</ReputationMetricsEnabled>"
            + (f"<LastFreshStart>{iso(fresh)}</LastFreshStart>" if fresh.seconds else "")
            + "</ReputationOptions>"
        )
    return "".join(parts)


def _v1_definition(form: Form) -> cs.EventDestinationDefinition:
    prefix = "EventDestination."
    types = []
    for value in members(form, prefix + "MatchingEventTypes"):
        if value not in _V1_EVENT_TYPES:
            raise ApiError(BAD_REQUEST, f"MatchingEventTypes {value[:64]!r} is not a valid event type.")
        types.append(_V1_EVENT_TYPES[value])
    # The SES v2 shape of the same definition, so both APIs check it alike.
    data: dict[str, Any] = {
        "Enabled": form.get(prefix + "Enabled", "false").lower() == "true",
        "MatchingEventTypes": types,
    }
    for v1_name, v2_name in (
        ("CloudWatchDestination", "CloudWatchDestination"),
        ("KinesisFirehoseDestination", "KinesisFirehoseDestination"),
    ):
        if any(k.startswith(prefix + v1_name + ".") for k in form):
            data[v2_name] = {}
    if any(k.startswith(prefix + "SNSDestination.") for k in form):
        data["SnsDestination"] = {"TopicArn": form.get(prefix + "SNSDestination.TopicARN", "")}
    return event_destination_definition(data)


async def _destination_names(call: AccountCalls, set_name: str) -> set[str]:
    reply = await _set_call(
        call,
        call.clients.feedback.GetConfigurationSetEventDestinations,
        cs.GetConfigurationSetEventDestinationsRequest(configuration_set_name=set_name),
    )
    return {d.name for d in reply.event_destinations}


async def create_configuration_set_event_destination(call: AccountCalls, form: Form) -> str:
    set_name, name = form.get("ConfigurationSetName", ""), form.get("EventDestination.Name", "")
    definition = _v1_definition(form)
    if name in await _destination_names(call, set_name):
        raise ApiError(EVENT_DESTINATION_ALREADY_EXISTS, f"Event destination {name} already exists.")
    await _set_call(
        call,
        call.clients.feedback.CreateConfigurationSetEventDestination,
        cs.CreateConfigurationSetEventDestinationRequest(
            configuration_set_name=set_name, event_destination_name=name, event_destination=definition
        ),
    )
    return ""


async def update_configuration_set_event_destination(call: AccountCalls, form: Form) -> str:
    set_name, name = form.get("ConfigurationSetName", ""), form.get("EventDestination.Name", "")
    definition = _v1_definition(form)
    if name not in await _destination_names(call, set_name):
        raise ApiError(EVENT_DESTINATION_DOES_NOT_EXIST, f"Event destination {name} does not exist.")
    await call(
        call.clients.feedback.UpdateConfigurationSetEventDestination,
        cs.UpdateConfigurationSetEventDestinationRequest(
            configuration_set_name=set_name, event_destination_name=name, event_destination=definition
        ),
    )
    return ""


async def delete_configuration_set_event_destination(call: AccountCalls, form: Form) -> str:
    set_name, name = form.get("ConfigurationSetName", ""), form.get("EventDestinationName", "")
    if name not in await _destination_names(call, set_name):
        raise ApiError(EVENT_DESTINATION_DOES_NOT_EXIST, f"Event destination {name} does not exist.")
    await call(
        call.clients.feedback.DeleteConfigurationSetEventDestination,
        cs.DeleteConfigurationSetEventDestinationRequest(
            configuration_set_name=set_name, event_destination_name=name
        ),
    )
    return ""


ACTIONS: dict[str, Action] = {
    "SendEmail": send_email,
    "SendRawEmail": send_raw_email,
    "SendTemplatedEmail": send_templated_email,
    "GetSendQuota": get_send_quota,
    "GetSendStatistics": get_send_statistics,
    "VerifyEmailIdentity": verify_email_identity,
    "VerifyEmailAddress": verify_email_identity,
    "VerifyDomainIdentity": verify_domain_identity,
    "VerifyDomainDkim": verify_domain_dkim,
    "ListIdentities": list_identities,
    "DeleteIdentity": delete_identity,
    "GetIdentityVerificationAttributes": get_identity_verification_attributes,
    "SendBulkTemplatedEmail": send_bulk_templated_email,
    "CreateTemplate": create_template,
    "GetTemplate": get_template,
    "UpdateTemplate": update_template,
    "DeleteTemplate": delete_template,
    "ListTemplates": list_templates,
    "TestRenderTemplate": test_render_template,
    "GetAccountSendingEnabled": get_account_sending_enabled,
    "UpdateAccountSendingEnabled": update_account_sending_enabled,
    "GetIdentityDkimAttributes": get_identity_dkim_attributes,
    "SetIdentityDkimEnabled": set_identity_dkim_enabled,
    "GetIdentityMailFromDomainAttributes": get_identity_mail_from_domain_attributes,
    "SetIdentityMailFromDomain": set_identity_mail_from_domain,
    "PutIdentityPolicy": put_identity_policy,
    "GetIdentityPolicies": get_identity_policies,
    "ListIdentityPolicies": list_identity_policies,
    "DeleteIdentityPolicy": delete_identity_policy,
    "ListVerifiedEmailAddresses": list_verified_email_addresses,
    "DeleteVerifiedEmailAddress": delete_verified_email_address,
    "SetIdentityNotificationTopic": set_identity_notification_topic,
    "SetIdentityHeadersInNotificationsEnabled": set_identity_headers_in_notifications_enabled,
    "SetIdentityFeedbackForwardingEnabled": set_identity_feedback_forwarding_enabled,
    "GetIdentityNotificationAttributes": get_identity_notification_attributes,
    "CreateConfigurationSet": create_configuration_set,
    "DeleteConfigurationSet": delete_configuration_set,
    "DescribeConfigurationSet": describe_configuration_set,
    "ListConfigurationSets": list_configuration_sets,
    "UpdateConfigurationSetSendingEnabled": update_configuration_set_sending_enabled,
    "UpdateConfigurationSetReputationMetricsEnabled": update_configuration_set_reputation_metrics_enabled,
    "PutConfigurationSetDeliveryOptions": put_configuration_set_delivery_options,
    "CreateConfigurationSetTrackingOptions": create_configuration_set_tracking_options,
    "UpdateConfigurationSetTrackingOptions": update_configuration_set_tracking_options,
    "DeleteConfigurationSetTrackingOptions": delete_configuration_set_tracking_options,
    "CreateConfigurationSetEventDestination": create_configuration_set_event_destination,
    "UpdateConfigurationSetEventDestination": update_configuration_set_event_destination,
    "DeleteConfigurationSetEventDestination": delete_configuration_set_event_destination,
}


def _request_id(request_id: str) -> str:
    return f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"


def request_form(method: str, query: MultiMapping[str], body: bytes) -> Form:
    if method == "POST":
        return parse_form(body)
    if method == "GET":
        return dict(query)
    raise ApiError(UNKNOWN_OPERATION, f"The Query API takes GET or POST, not {method[:16]}.")


def operation_name(form: Form) -> str:
    """The SES action a request is for ("unknown" if none), as metrics label it."""
    name = form.get("Action", "")
    return name if name in ACTIONS else "unknown"


async def dispatch(call: AccountCalls, form: Form, request_id: str) -> web.Response:
    name = form.get("Action", "")
    action = ACTIONS.get(name)
    if action is None:
        raise ApiError(UNKNOWN_OPERATION, f"Could not find operation {name[:64]} for version {VERSION}.")
    result = await action(call, form)
    xml = (
        f'<{name}Response xmlns="{NAMESPACE}"><{name}Result>{result}</{name}Result>'
        f"{_request_id(request_id)}</{name}Response>"
    )
    return web.Response(text=xml, content_type="text/xml", headers={"x-amzn-RequestId": request_id})


def error_response(error: ApiError, request_id: str) -> web.Response:
    kind = "Receiver" if error.error.v1_status >= 500 else "Sender"
    xml = (
        f'<ErrorResponse xmlns="{NAMESPACE}"><Error><Type>{kind}</Type>'
        f"<Code>{error.error.v1_code}</Code><Message>{escape(error.message)}</Message></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    )
    return web.Response(
        text=xml,
        status=error.error.v1_status,
        content_type="text/xml",
        headers={"x-amzn-RequestId": request_id},
    )
