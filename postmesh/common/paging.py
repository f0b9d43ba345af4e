"""Page tokens for every List RPC (AIP-158): opaque, keyset-based, validated."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute

from postmesh.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


def page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative.", field="page_size")
    return min(requested or default, maximum)


def encode_token(last_key: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": last_key}).encode()).decode().rstrip("=")


def decode_token(token: str) -> Any:
    try:
        padded = token + "=" * (-len(token) % 4)
        return json.loads(base64.urlsafe_b64decode(padded.encode()))["after"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument(
            "page_token is not a token this service returned.", field="page_token"
        ) from None


def keyset_page(
    statement: Select[Any], key: InstrumentedAttribute[Any], requested_size: int, token: str
) -> tuple[Select[Any], int]:
    """Orders by `key`, starts after the token's key, and fetches one extra row to know if more follow."""
    size = page_size(requested_size)
    if token:
        statement = statement.where(key > decode_token(token))
    return statement.order_by(key).limit(size + 1), size


def split_page(rows: Sequence[T], size: int, key_of: Any) -> tuple[Sequence[T], str]:
    """The page's rows and the token for the next page ("" on the last page)."""
    if len(rows) > size:
        page = rows[:size]
        return page, encode_token(key_of(page[-1]))
    return rows, ""
