"""The accept path's domain errors as SMTP replies, in one place (the codes and texts SES's SMTP
interface uses, without enhanced status codes as SES answers them; postmesh's own limits add them).

Temporary refusals (throttling, a service that cannot be reached) are 4xx so clients retry; a message
that will never be accepted as it is gets 5xx with the reason.
"""

from __future__ import annotations

import re

from postmesh.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    PostmeshError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

MAX_RECIPIENTS_REPLY = "452 4.5.3 Too many recipients: at most {limit} per message"
CONNECTION_RECIPIENTS_REPLY = "452 4.5.3 Too many recipients on this connection; reconnect to send more"
CONNECTION_MESSAGES_REPLY = "452 4.5.3 Too many messages on this connection; reconnect to send more"
TOO_MANY_CONNECTIONS_REPLY = "421 4.7.0 Too many connections; try again later"
TOO_MANY_AUTH_FAILURES_REPLY = "421 4.7.0 Too many failed authentication attempts"
CREDENTIALS_INVALID_REPLY = "535 Authentication Credentials Invalid"
AUTHENTICATION_REQUIRED_REPLY = "530 Authentication required"
AUTH_UNAVAILABLE_REPLY = "454 4.7.0 Temporary authentication failure; try again"
LOCAL_ERROR_REPLY = "451 4.3.0 Local error in processing; try again"
SHUTTING_DOWN_REPLY = "421 4.3.2 Service shutting down; try again"

_SENDING_PAUSED = {"ACCOUNT_SENDING_PAUSED"}
_REJECTED = {"MESSAGE_REJECTED", "MAIL_FROM_DOMAIN_NOT_VERIFIED"}
# SMTP reply text is one line of printable characters; a reason is cut, never split.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")
_MAX_TEXT = 480


def _text(message: str) -> str:
    return _UNPRINTABLE.sub(" ", message).strip()[:_MAX_TEXT]


def accepted_reply(message_id: str) -> str:
    return f"250 Ok {message_id}"


def reply_for(error: PostmeshError) -> str:
    """The SMTP reply for a refusal of the accept path."""
    text = _text(error.message)
    if isinstance(error, ResourceExhausted):
        return f"454 Throttling failure: {text}"
    if isinstance(error, Unavailable):
        return f"451 4.3.0 {text}"
    if isinstance(error, Unauthenticated):
        return CREDENTIALS_INVALID_REPLY
    if error.reason in _SENDING_PAUSED:
        return "554 Sending paused for this account"
    if (
        isinstance(error, InvalidArgument)
        and error.reason == "MESSAGE_REJECTED"
        and error.metadata.get("field") == "content"
    ):
        return f"552 {text}"  # the size check
    if error.reason in _REJECTED or isinstance(error, FailedPrecondition | PermissionDenied):
        return f"554 Message rejected: {text}"
    return f"554 Transaction failed: {text}"
