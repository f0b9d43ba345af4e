"""Small conversions between protobuf well-known types and Python values."""

from __future__ import annotations

import datetime as dt
from typing import overload

from google.protobuf.timestamp_pb2 import Timestamp

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# The range Timestamp.ToDatetime accepts (0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z).
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799


@overload
def timestamp(value: dt.datetime) -> Timestamp: ...
@overload
def timestamp(value: None) -> None: ...
def timestamp(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    set_timestamp(ts, value.astimezone(dt.UTC))
    return ts


def set_timestamp(ts: Timestamp, value: dt.datetime) -> None:
    """`ts.FromDatetime(value)` (a naive datetime read as UTC, as there) at a fifth of its CPU for a
    UTC datetime in range (protobuf's is pure Python: a timegm of a utctimetuple); protobuf's own
    conversion for anything else."""
    if value.tzinfo is dt.UTC:
        delta = value - _EPOCH
        seconds = delta.days * 86_400 + delta.seconds
        if _MIN_SECONDS <= seconds <= _MAX_SECONDS:
            ts.seconds = seconds
            ts.nanos = delta.microseconds * 1000
            return
    ts.FromDatetime(value)


def utc_datetime(ts: Timestamp) -> dt.datetime:
    """`ts.ToDatetime(tzinfo=dt.UTC)` at less than half its CPU (protobuf's is pure Python, with a
    time zone conversion): the same value, and the same ValueError for a timestamp out of range."""
    seconds, nanos = ts.seconds, ts.nanos
    if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        return ts.ToDatetime(tzinfo=dt.UTC)
    return _EPOCH + dt.timedelta(seconds=seconds, microseconds=nanos // 1000)


def from_timestamp(ts: Timestamp) -> dt.datetime | None:
    """None for an unset (zero) timestamp."""
    seconds, nanos = ts.seconds, ts.nanos
    if seconds == 0 and nanos == 0:
        return None
    return utc_datetime(ts)
