"""What every SES v2 operation module shares: the request as handlers see it, and enum and member
helpers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from multidict import MultiMapping

from services.gateway.calls import AccountCalls
from services.gateway.errors import BAD_REQUEST, SERIALIZATION, ApiError

JSON = dict[str, Any]


@dataclass(frozen=True)
class V2Request:
    path: dict[str, str]
    query: MultiMapping[str]
    body: JSON


Handler = Callable[[AccountCalls, V2Request], Awaitable[JSON]]


def enum_name(enum: Any, value: int, prefix: str) -> str | None:
    name: str = enum.Name(value)
    return None if name.endswith("_UNSPECIFIED") else name.removeprefix(prefix)


def enum_value(enum: Any, text: str, prefix: str, member: str) -> Any:
    if not text:
        return 0
    try:
        value = enum.Value(prefix + text)
    except ValueError:
        raise ApiError(BAD_REQUEST, f"{member} {text[:64]!r} is not a valid value.") from None
    return value


def unsupported(data: JSON, *members: str) -> None:
    """SES members postmesh does not implement yet are refused, never silently dropped."""
    given = [m for m in members if data.get(m) not in (None, [], {})]
    if given:
        raise ApiError(BAD_REQUEST, f"postmesh does not support {', '.join(given)} yet.")


def page_size(query: MultiMapping[str]) -> int:
    text = query.get("PageSize", "")
    if not text:
        return 0
    if not text.isdigit() or len(text) > 9:
        raise ApiError(SERIALIZATION, "PageSize must be a non-negative integer.")
    return int(text)
