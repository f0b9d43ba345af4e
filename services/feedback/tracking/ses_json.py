"""The `open` and `click` objects of SES's event-publishing JSON, for the renderer of event
destinations (AWS's examples: ses-event-examples/event-open.json and event-click.json)."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from postmesh.events.v1 import tracking_pb2


def ses_timestamp(value: Timestamp) -> str:
    """SES's form: ISO 8601 in UTC with milliseconds, 2017-08-09T22:00:19.652Z."""
    moment = value.ToDatetime()
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def open_json(detail: tracking_pb2.Open) -> dict[str, Any]:
    return {
        "ipAddress": detail.ip_address,
        "timestamp": ses_timestamp(detail.timestamp),
        "userAgent": detail.user_agent,
    }


def click_json(detail: tracking_pb2.Click) -> dict[str, Any]:
    tags: dict[str, list[str]] = {}
    for tag in detail.link_tags:
        tags.setdefault(tag.name, []).append(tag.value)
    return {
        "ipAddress": detail.ip_address,
        "link": detail.link,
        "linkTags": tags,
        "timestamp": ses_timestamp(detail.timestamp),
        "userAgent": detail.user_agent,
    }
