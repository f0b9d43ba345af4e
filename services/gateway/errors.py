"""SES's error types, and the one table from postmesh's gRPC status + reason to them.

A request fails with ApiError; the server renders it in the protocol of the request: SES v2's
`x-amzn-ErrorType` header and JSON body, or SES v1's XML ErrorResponse. botocore reads either and
raises its own exception class for the code.
"""

from __future__ import annotations

from dataclasses import dataclass

from postmesh.common.errors import Code


@dataclass(frozen=True)
class SesError:
    """One SES error type: its code and HTTP status in v2 (REST JSON) and in v1 (Query)."""

    v2_code: str
    v2_status: int
    v1_code: str
    v1_status: int = 400


class ApiError(Exception):
    def __init__(self, error: SesError, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


BAD_REQUEST = SesError("BadRequestException", 400, "InvalidParameterValue")
NOT_FOUND = SesError("NotFoundException", 404, "NotFound")
ALREADY_EXISTS = SesError("AlreadyExistsException", 400, "AlreadyExists")
LIMIT_EXCEEDED = SesError("LimitExceededException", 400, "LimitExceeded")
TOO_MANY_REQUESTS = SesError("TooManyRequestsException", 429, "Throttling")
MESSAGE_REJECTED = SesError("MessageRejected", 400, "MessageRejected")
MAIL_FROM_NOT_VERIFIED = SesError(
    "MailFromDomainNotVerifiedException", 400, "MailFromDomainNotVerifiedException"
)
SENDING_PAUSED = SesError("SendingPausedException", 400, "AccountSendingPausedException")
ACCOUNT_SUSPENDED = SesError("AccountSuspendedException", 400, "AccountSendingPausedException")
TEMPLATE_DOES_NOT_EXIST = SesError("NotFoundException", 404, "TemplateDoesNotExist")
ACCESS_DENIED = SesError("AccessDeniedException", 403, "AccessDenied", 403)
SERVICE_UNAVAILABLE = SesError("ServiceUnavailable", 503, "ServiceUnavailable", 503)
INTERNAL_FAILURE = SesError("InternalFailure", 500, "InternalFailure", 500)

# SES v1's own codes for configuration sets (v2 says NotFound / AlreadyExists).
CONFIGURATION_SET_DOES_NOT_EXIST = SesError("NotFoundException", 404, "ConfigurationSetDoesNotExist")
CONFIGURATION_SET_ALREADY_EXISTS = SesError("AlreadyExistsException", 400, "ConfigurationSetAlreadyExists")
EVENT_DESTINATION_DOES_NOT_EXIST = SesError("NotFoundException", 404, "EventDestinationDoesNotExist")
EVENT_DESTINATION_ALREADY_EXISTS = SesError("AlreadyExistsException", 400, "EventDestinationAlreadyExists")
TRACKING_OPTIONS_ALREADY_EXIST = SesError(
    "AlreadyExistsException", 400, "TrackingOptionsAlreadyExistsException"
)
TRACKING_OPTIONS_DO_NOT_EXIST = SesError("NotFoundException", 404, "TrackingOptionsDoesNotExistException")

# Authentication and request format (AWS's common errors, named per protocol).
MISSING_AUTHENTICATION = SesError(
    "MissingAuthenticationTokenException", 403, "MissingAuthenticationToken", 403
)
INCOMPLETE_SIGNATURE = SesError("IncompleteSignatureException", 403, "IncompleteSignature", 403)
INVALID_SIGNATURE = SesError("InvalidSignatureException", 403, "SignatureDoesNotMatch", 403)
UNRECOGNIZED_CLIENT = SesError("UnrecognizedClientException", 403, "InvalidClientTokenId", 403)
SERIALIZATION = SesError("SerializationException", 400, "MalformedQueryString")
UNKNOWN_OPERATION = SesError("UnknownOperationException", 404, "InvalidAction")
PAYLOAD_TOO_LARGE = SesError("BadRequestException", 413, "RequestEntityTooLarge", 413)

# postmesh's reasons (google.rpc.ErrorInfo.reason) that have an SES error type of their own.
BY_REASON: dict[str, SesError] = {
    "MESSAGE_REJECTED": MESSAGE_REJECTED,
    "RENDERING_FAILURE": MESSAGE_REJECTED,
    "MAIL_FROM_DOMAIN_NOT_VERIFIED": MAIL_FROM_NOT_VERIFIED,
    "ACCOUNT_SENDING_PAUSED": SENDING_PAUSED,
    "ACCOUNT_SUSPENDED": ACCOUNT_SUSPENDED,
    "MAX_SEND_RATE_EXCEEDED": TOO_MANY_REQUESTS,
    # Not worth retrying within the day: SES v2 says LimitExceeded (v1 says Throttling, as SES does).
    "DAILY_QUOTA_EXCEEDED": SesError("LimitExceededException", 400, "Throttling"),
    "TOO_MANY_REQUESTS": TOO_MANY_REQUESTS,
    "LIMIT_EXCEEDED": LIMIT_EXCEEDED,
    "TEMPLATE_DOES_NOT_EXIST": TEMPLATE_DOES_NOT_EXIST,
    "INVALID_TEMPLATE": SesError("BadRequestException", 400, "InvalidTemplate"),
    "ALREADY_EXISTS": ALREADY_EXISTS,
    "UNRECOGNIZED_CLIENT": UNRECOGNIZED_CLIENT,
    "ACCESS_KEY_REVOKED": UNRECOGNIZED_CLIENT,
    "ACCOUNT_DISABLED": UNRECOGNIZED_CLIENT,
    "INVALID_SIGNATURE": INVALID_SIGNATURE,
}

# Otherwise the gRPC status decides.
BY_CODE: dict[str, SesError] = {
    Code.INVALID_ARGUMENT.value: BAD_REQUEST,
    Code.FAILED_PRECONDITION.value: BAD_REQUEST,
    Code.NOT_FOUND.value: NOT_FOUND,
    Code.ALREADY_EXISTS.value: ALREADY_EXISTS,
    Code.RESOURCE_EXHAUSTED.value: TOO_MANY_REQUESTS,
    Code.PERMISSION_DENIED.value: ACCESS_DENIED,
    Code.UNAUTHENTICATED.value: UNRECOGNIZED_CLIENT,
    Code.UNAVAILABLE.value: SERVICE_UNAVAILABLE,
    "DEADLINE_EXCEEDED": SERVICE_UNAVAILABLE,
}


def ses_error_for(code_name: str, reason: str) -> SesError:
    return BY_REASON.get(reason) or BY_CODE.get(code_name, INTERNAL_FAILURE)
