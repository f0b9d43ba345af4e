"""Domain errors: raised by domain code (which never imports grpc), mapped to gRPC statuses in one place.

Each error carries an SES-like reason (UPPER_SNAKE, sent as google.rpc.ErrorInfo.reason) and a message
a person can act on. The server interceptor turns them into a status with the ErrorInfo attached.
"""

from __future__ import annotations

from enum import Enum


class Code(Enum):
    """The gRPC status an error maps to (names as in grpc.StatusCode, without importing grpc)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


ERROR_DOMAIN = "postmesh.dev"


class PostmeshError(Exception):
    code: Code = Code.INTERNAL
    default_reason = "INTERNAL_FAILURE"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.retry_after_seconds = retry_after_seconds


class InvalidArgument(PostmeshError):
    """A request field is malformed. `field` names it, as SES's BadRequestException does."""

    code = Code.INVALID_ARGUMENT
    default_reason = "BAD_REQUEST"

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message, reason=reason, metadata={"field": field} if field else None)
        self.field = field


class NotFound(PostmeshError):
    code = Code.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(PostmeshError):
    code = Code.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(PostmeshError):
    code = Code.PERMISSION_DENIED
    default_reason = "ACCESS_DENIED"


class Unauthenticated(PostmeshError):
    code = Code.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class FailedPrecondition(PostmeshError):
    code = Code.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(PostmeshError):
    code = Code.RESOURCE_EXHAUSTED
    default_reason = "LIMIT_EXCEEDED"


class Unavailable(PostmeshError):
    code = Code.UNAVAILABLE
    default_reason = "SERVICE_UNAVAILABLE"


def require(condition: bool, message: str, *, field: str) -> None:
    """Raises InvalidArgument naming `field` unless `condition` holds."""
    if not condition:
        raise InvalidArgument(message, field=field)
