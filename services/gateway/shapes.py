"""Reading SES request members with their types checked: a wrong type is SES's SerializationException
(v2) or InvalidParameterValue (v1), never a crash."""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.gateway.errors import SERIALIZATION, ApiError


def _wrong(name: str, expected: str) -> ApiError:
    return ApiError(SERIALIZATION, f"{name} must be {expected}.")


def obj(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _wrong(name, "an object")
    return value


def string(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _wrong(name, "a string")
    return value


def boolean(data: dict[str, Any], name: str) -> bool | None:
    value = data.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise _wrong(name, "a boolean")


def integer(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise _wrong(name, "a non-negative integer")
    return value


def strings(data: dict[str, Any], name: str) -> list[str]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _wrong(name, "a list of strings")
    return value


def objects(data: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _wrong(name, "a list of objects")
    return value


def epoch(ts: Timestamp) -> float | None:
    """A timestamp as REST JSON carries it (seconds since the epoch), or None when unset."""
    if not ts.seconds and not ts.nanos:
        return None
    return ts.seconds + ts.nanos / 1e9


def iso(ts: Timestamp) -> str:
    """A timestamp as the Query protocol carries it."""
    return ts.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_time(value: str, name: str) -> Timestamp:
    """A query-string timestamp: ISO 8601 (botocore's choice) or seconds since the epoch."""
    try:
        when = dt.datetime.fromtimestamp(float(value), dt.UTC)
    except (ValueError, OverflowError, OSError):
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ApiError(SERIALIZATION, f"{name} must be an ISO 8601 timestamp.") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    ts = Timestamp()
    try:
        ts.FromDatetime(when.astimezone(dt.UTC))
    except (ValueError, OverflowError):
        raise ApiError(SERIALIZATION, f"{name} is out of range.") from None
    return ts


def without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}
