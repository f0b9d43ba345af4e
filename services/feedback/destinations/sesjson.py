"""postmesh events as SES's JSON: event publishing records (`eventType`, what configuration set
destinations receive) and identity notifications (`notificationType`).

The shapes follow AWS's own example records (tests compare them key by key): SES's key names and
spellings ("Rendering Failure", "DeliveryDelay"), timestamps as YYYY-MM-DDThh:mm:ss.sssZ, tags as
name -> [values] with SES's automatic `ses:` tags, and commonHeaders derived from the message headers
(or, when an event carries none, from what the event knows: source, destination, subject).
"""

from __future__ import annotations

import datetime as dt
import json
from email.utils import formataddr, getaddresses
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from postmesh.events.v1 import events_pb2 as ev
from postmesh.events.v1 import tracking_pb2

# SES's ARN layout with postmesh's own partition: no AWS region or account stands behind it.
SOURCE_ARN = "arn:postmesh:ses:postmesh:{account}:identity/{identity}"

EVENT_TYPE_NAMES: dict[int, str] = {
    ev.EMAIL_EVENT_TYPE_SEND: "Send",
    ev.EMAIL_EVENT_TYPE_REJECT: "Reject",
    ev.EMAIL_EVENT_TYPE_BOUNCE: "Bounce",
    ev.EMAIL_EVENT_TYPE_COMPLAINT: "Complaint",
    ev.EMAIL_EVENT_TYPE_DELIVERY: "Delivery",
    ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY: "DeliveryDelay",
    ev.EMAIL_EVENT_TYPE_RENDERING_FAILURE: "Rendering Failure",
    ev.EMAIL_EVENT_TYPE_OPEN: "Open",
    ev.EMAIL_EVENT_TYPE_CLICK: "Click",
    ev.EMAIL_EVENT_TYPE_SUBSCRIPTION: "Subscription",
}

# The API names (SEND, BOUNCE, ...) of the event types, as configuration set destinations match them.
API_NAMES: dict[int, str] = {
    value: ev.EmailEventType.Name(value).removeprefix("EMAIL_EVENT_TYPE_")  # type: ignore[arg-type]
    for value in EVENT_TYPE_NAMES
}
BY_API_NAME = {name: value for value, name in API_NAMES.items()}

_BOUNCE_TYPES = {
    ev.BOUNCE_TYPE_UNDETERMINED: "Undetermined",
    ev.BOUNCE_TYPE_PERMANENT: "Permanent",
    ev.BOUNCE_TYPE_TRANSIENT: "Transient",
}
_BOUNCE_SUB_TYPES = {
    ev.BOUNCE_SUB_TYPE_GENERAL: "General",
    ev.BOUNCE_SUB_TYPE_NO_EMAIL: "NoEmail",
    ev.BOUNCE_SUB_TYPE_SUPPRESSED: "Suppressed",
    ev.BOUNCE_SUB_TYPE_ON_ACCOUNT_SUPPRESSION_LIST: "OnAccountSuppressionList",
    ev.BOUNCE_SUB_TYPE_MAILBOX_FULL: "MailboxFull",
    ev.BOUNCE_SUB_TYPE_MESSAGE_TOO_LARGE: "MessageTooLarge",
    ev.BOUNCE_SUB_TYPE_CONTENT_REJECTED: "ContentRejected",
    ev.BOUNCE_SUB_TYPE_ATTACHMENT_REJECTED: "AttachmentRejected",
}
# commonHeaders keys, by lower-case header name; the address lists are lists.
_COMMON_LISTS = {"from": "from", "to": "to", "cc": "cc", "bcc": "bcc", "reply-to": "replyTo"}
_COMMON_SINGLE = {"date": "date", "subject": "subject", "return-path": "returnPath"}


def timestamp_text(value: Timestamp | dt.datetime) -> str:
    """2017-08-05T00:41:02.669Z."""
    moment = value.ToDatetime(tzinfo=dt.UTC) if isinstance(value, Timestamp) else value.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def tags(mail: ev.Mail) -> dict[str, list[str]]:
    """The message tags with SES's automatic ones first."""
    result: dict[str, list[str]] = {}
    if mail.configuration_set_name:
        result["ses:configuration-set"] = [mail.configuration_set_name]
    sender = getaddresses([mail.source])
    if sender and sender[0][1]:
        result["ses:from-domain"] = [_domain(sender[0][1])]
    result["ses:caller-identity"] = [mail.sending_account_id]
    for tag in mail.tags:
        result.setdefault(tag.name, []).append(tag.value)
    return result


def _addresses(value: str) -> list[str]:
    return [formataddr(pair) if pair[0] else pair[1] for pair in getaddresses([value]) if pair[1]]


def _message_id(mail: ev.Mail) -> str:
    """SES's own id for a Message-ID it made (postmesh's <id@domain>), else the header's value."""
    for header in mail.headers:
        if header.name.lower() == "message-id":
            value = header.value.strip().strip("<>")
            return mail.message_id if value.partition("@")[0] == mail.message_id else value
    return mail.message_id


def common_headers(mail: ev.Mail) -> dict[str, Any]:
    common: dict[str, Any] = {}
    for header in mail.headers:
        name = header.name.lower()
        if name in _COMMON_LISTS:
            # As SES: one entry per header, its addresses re-rendered (quotes dropped) and comma-joined.
            common.setdefault(_COMMON_LISTS[name], []).append(", ".join(_addresses(header.value)))
        elif name in _COMMON_SINGLE:
            common[_COMMON_SINGLE[name]] = header.value
    if "from" not in common and mail.source:
        common["from"] = [mail.source]
    if "to" not in common and mail.destination and not mail.headers:
        common["to"] = list(mail.destination)
    common["messageId"] = _message_id(mail)
    if "subject" not in common and mail.subject:
        common["subject"] = mail.subject
    return common


def _mail(mail: ev.Mail, *, with_tags: bool = True, common: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {
        "timestamp": timestamp_text(mail.timestamp),
        "source": mail.source,
        "sourceArn": SOURCE_ARN.format(
            account=mail.sending_account_id, identity=mail.source_identity or _domain(mail.source)
        ),
        "sendingAccountId": mail.sending_account_id,
        "messageId": mail.message_id,
        "destination": list(mail.destination),
        # Mail.headers_truncated arrives with the sender filling Mail.headers; until then: False.
        "headersTruncated": bool(getattr(mail, "headers_truncated", False)),
    }
    if mail.headers:
        result["headers"] = [{"name": h.name, "value": h.value} for h in mail.headers]
    if common or mail.headers:
        result["commonHeaders"] = common_headers(mail)
    if with_tags:
        result["tags"] = tags(mail)
    return result


def _optional(target: dict[str, Any], key: str, value: object) -> None:
    if value:
        target[key] = value


def _bounce(bounce: ev.Bounce) -> dict[str, Any]:
    recipients = []
    for r in bounce.bounced_recipients:
        one: dict[str, Any] = {"emailAddress": r.email_address}
        _optional(one, "action", r.action)
        _optional(one, "status", r.status)
        _optional(one, "diagnosticCode", r.diagnostic_code)
        recipients.append(one)
    result: dict[str, Any] = {
        "bounceType": _BOUNCE_TYPES.get(bounce.bounce_type, "Undetermined"),
        "bounceSubType": _BOUNCE_SUB_TYPES.get(bounce.bounce_sub_type, "General"),
        "bouncedRecipients": recipients,
        "timestamp": timestamp_text(bounce.timestamp),
        "feedbackId": bounce.feedback_id,
    }
    _optional(result, "reportingMTA", bounce.reporting_mta)
    _optional(result, "remoteMtaIp", bounce.remote_mta_ip)
    return result


def _complaint(complaint: ev.Complaint) -> dict[str, Any]:
    result: dict[str, Any] = {
        "complainedRecipients": [{"emailAddress": r.email_address} for r in complaint.complained_recipients],
        "timestamp": timestamp_text(complaint.timestamp),
        "feedbackId": complaint.feedback_id,
    }
    _optional(result, "userAgent", complaint.user_agent)
    _optional(result, "complaintFeedbackType", complaint.complaint_feedback_type)
    if complaint.HasField("arrival_date"):
        result["arrivalDate"] = timestamp_text(complaint.arrival_date)
    _optional(result, "complaintSubType", complaint.complaint_sub_type)
    return result


def _delivery(delivery: ev.Delivery) -> dict[str, Any]:
    result: dict[str, Any] = {
        "timestamp": timestamp_text(delivery.timestamp),
        "processingTimeMillis": int(delivery.processing_time_millis),
        "recipients": list(delivery.recipients),
        "smtpResponse": delivery.smtp_response,
    }
    _optional(result, "reportingMTA", delivery.reporting_mta)
    _optional(result, "remoteMtaIp", delivery.remote_mta_ip)
    return result


def _delay(delay: ev.DeliveryDelay) -> dict[str, Any]:
    result: dict[str, Any] = {
        "timestamp": timestamp_text(delay.timestamp),
        "delayType": delay.delay_type or "Undetermined",
    }
    if delay.HasField("expiration_time"):
        result["expirationTime"] = timestamp_text(delay.expiration_time)
    recipients = []
    for r in delay.delayed_recipients:
        one: dict[str, Any] = {"emailAddress": r.email_address}
        _optional(one, "status", r.status)
        _optional(one, "diagnosticCode", r.diagnostic_code)
        recipients.append(one)
    result["delayedRecipients"] = recipients
    _optional(result, "reportingMTA", delay.reporting_mta)
    return result


def _open(detail: tracking_pb2.Open) -> dict[str, Any]:
    return {
        "ipAddress": detail.ip_address,
        "timestamp": timestamp_text(detail.timestamp),
        "userAgent": detail.user_agent,
    }


def _click(detail: tracking_pb2.Click) -> dict[str, Any]:
    link_tags: dict[str, list[str]] = {}
    for tag in detail.link_tags:
        link_tags.setdefault(tag.name, []).append(tag.value)
    return {
        "ipAddress": detail.ip_address,
        "link": detail.link,
        "linkTags": link_tags,
        "timestamp": timestamp_text(detail.timestamp),
        "userAgent": detail.user_agent,
    }


def event_record(event: ev.Event) -> dict[str, Any]:
    """The event publishing record of an email event (what a configuration set destination gets)."""
    email = event.email
    kind = email.event_type
    # As in AWS's records: no commonHeaders for a message never built or not yet handed over,
    # unless the event carries the headers.
    common = kind not in (ev.EMAIL_EVENT_TYPE_RENDERING_FAILURE, ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY)
    record: dict[str, Any] = {"eventType": EVENT_TYPE_NAMES[kind], "mail": _mail(email.mail, common=common)}
    if kind == ev.EMAIL_EVENT_TYPE_SEND:
        record["send"] = {}
    elif kind == ev.EMAIL_EVENT_TYPE_REJECT:
        record["reject"] = {"reason": email.reject.reason}
    elif kind == ev.EMAIL_EVENT_TYPE_BOUNCE:
        record["bounce"] = _bounce(email.bounce)
    elif kind == ev.EMAIL_EVENT_TYPE_COMPLAINT:
        record["complaint"] = _complaint(email.complaint)
    elif kind == ev.EMAIL_EVENT_TYPE_DELIVERY:
        record["delivery"] = _delivery(email.delivery)
    elif kind == ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY:
        record["deliveryDelay"] = _delay(email.delivery_delay)
    elif kind == ev.EMAIL_EVENT_TYPE_RENDERING_FAILURE:
        record["failure"] = {
            "errorMessage": email.rendering_failure.error_message,
            "templateName": email.rendering_failure.template_name,
        }
    elif kind == ev.EMAIL_EVENT_TYPE_OPEN:
        record["open"] = _open(email.open)
    elif kind == ev.EMAIL_EVENT_TYPE_CLICK:
        record["click"] = _click(email.click)
    return record


# Identity notifications exist for these three only (SES v1).
_NOTIFICATION_TYPES = {
    ev.EMAIL_EVENT_TYPE_BOUNCE: "Bounce",
    ev.EMAIL_EVENT_TYPE_COMPLAINT: "Complaint",
    ev.EMAIL_EVENT_TYPE_DELIVERY: "Delivery",
}


def notification_record(event: ev.Event, *, include_headers: bool = True) -> dict[str, Any] | None:
    """The identity notification (`notificationType`) of a Bounce, Complaint or Delivery; None for
    other events."""
    email = event.email
    kind = email.event_type
    if kind not in _NOTIFICATION_TYPES:
        return None
    mail = _mail(email.mail, with_tags=False)
    mail["callerIdentity"] = email.mail.sending_account_id
    if not include_headers:
        mail.pop("headers", None)
        mail.pop("commonHeaders", None)
    record: dict[str, Any] = {"notificationType": _NOTIFICATION_TYPES[kind], "mail": mail}
    if kind == ev.EMAIL_EVENT_TYPE_BOUNCE:
        record["bounce"] = _bounce(email.bounce)
    elif kind == ev.EMAIL_EVENT_TYPE_COMPLAINT:
        record["complaint"] = _complaint(email.complaint)
    else:
        record["delivery"] = _delivery(email.delivery)
    return record


def event_json(event: ev.Event) -> str:
    return json.dumps(event_record(event), separators=(",", ":"), ensure_ascii=False)
