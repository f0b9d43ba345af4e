"""SEND_MAX_IN_FLIGHT's counting (services.sender.accept.InFlightLimit); the refusal through the
whole mesh is in test_sending_e2e."""

from __future__ import annotations

import pytest

from postmesh.common.errors import Unavailable
from services.sender.accept import InFlightLimit


def test_sends_past_the_limit_are_refused_and_nothing_is_counted_for_them() -> None:
    limit = InFlightLimit(3)
    for _ in range(3):
        limit.enter(1)
    with pytest.raises(Unavailable) as refused:
        limit.enter(1)
    assert refused.value.reason == "SERVER_BUSY"
    assert refused.value.retry_after_seconds == 1.0
    assert limit.in_flight == 3
    limit.leave(1)
    limit.enter(1)  # room again
    assert limit.in_flight == 3


def test_a_bulk_send_counts_its_messages_and_one_larger_than_the_limit_goes_alone() -> None:
    limit = InFlightLimit(10)
    limit.enter(8)
    with pytest.raises(Unavailable):
        limit.enter(3)
    limit.enter(2)
    limit.leave(10)
    limit.enter(50)  # nothing else in flight: a bulk send of 50 is not refused forever
    with pytest.raises(Unavailable):
        limit.enter(1)
    limit.leave(50)
    assert limit.in_flight == 0


def test_zero_is_no_limit_and_a_negative_limit_is_a_setting_error() -> None:
    unlimited = InFlightLimit(0)
    for _ in range(10_000):
        unlimited.enter(1)
    assert unlimited.in_flight == 10_000
    with pytest.raises(ValueError, match="SEND_MAX_IN_FLIGHT"):
        InFlightLimit(-1)
