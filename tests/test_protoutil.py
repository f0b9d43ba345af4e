"""Conversions between protobuf's well-known types and Python values: utc_datetime is protobuf's
ToDatetime(tzinfo=UTC) (same value, same time zone, same error), set_timestamp its FromDatetime, only
cheaper."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import example, given
from hypothesis import strategies as st

from postmesh.common.protoutil import from_timestamp, set_timestamp, timestamp, utc_datetime

EDGES = [
    (0, 0),
    (0, 1),
    (1, 999),
    (1, 1000),
    (-1, 999_999_999),
    (1_764_600_123, 456_789_012),
    (-62135596800, 0),  # 0001-01-01T00:00:00Z, the first instant a Timestamp may hold
    (253402300799, 999_999_999),  # 9999-12-31T23:59:59.999999999Z, the last
]


@pytest.mark.parametrize(("seconds", "nanos"), EDGES)
def test_utc_datetime_is_protobufs_conversion(seconds: int, nanos: int) -> None:
    ts = Timestamp(seconds=seconds, nanos=nanos)
    converted = utc_datetime(ts)
    assert converted == ts.ToDatetime(tzinfo=dt.UTC)
    assert converted.tzinfo is dt.UTC
    assert converted.microsecond == nanos // 1000  # truncated, never rounded up


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(-62135596801, 0), (253402300800, 0), (0, -1), (0, 1_000_000_000)]
)
def test_a_timestamp_out_of_range_raises_as_protobuf_does(seconds: int, nanos: int) -> None:
    with pytest.raises(ValueError):
        utc_datetime(Timestamp(seconds=seconds, nanos=nanos))


def test_an_unset_timestamp_is_none() -> None:
    assert from_timestamp(Timestamp()) is None
    assert from_timestamp(Timestamp(nanos=1)) == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@example(dt.datetime(1961, 1, 1, tzinfo=zoneinfo.ZoneInfo("Africa/Dar_es_Salaam")))
@given(
    st.datetimes(
        min_value=dt.datetime(1, 1, 2),
        max_value=dt.datetime(9999, 12, 30),
        timezones=st.one_of(st.just(dt.UTC), st.timezones(), st.none()),
    )
)
def test_set_timestamp_is_protobufs_from_datetime(value: dt.datetime) -> None:
    """Any datetime, aware in any zone or naive (read as UTC): the same seconds and nanos as
    protobuf's FromDatetime, and timestamp() keeps converting aware and naive values as before."""
    ours, theirs = Timestamp(), Timestamp()
    set_timestamp(ours, value)
    theirs.FromDatetime(value)
    assert ours == theirs
    if value.tzinfo is not None:
        expected = Timestamp()
        expected.FromDatetime(value.astimezone(dt.UTC))
        assert timestamp(value) == expected
        assert utc_datetime(timestamp(value)) == value.astimezone(dt.UTC)  # (== itself is False in a gap)


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(1, 1, 1, tzinfo=dt.UTC),  # the first instant a Timestamp may hold
        dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),  # the last microsecond
        dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
        dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
    ],
)
def test_set_timestamp_at_the_edges(value: dt.datetime) -> None:
    ours, theirs = Timestamp(), Timestamp()
    set_timestamp(ours, value)
    theirs.FromDatetime(value)
    assert ours == theirs and utc_datetime(ours) == value
