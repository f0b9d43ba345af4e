"""Suppression list files: parsing an import (CSV or JSON) record by record, writing an export.

The shapes are those SES documents for its bulk import, and what postmesh exports reads back in:

  CSV         emailAddress,reason            (the header row is optional; more columns are ignored)
              user@example.com,BOUNCE
  JSON Lines  {"emailAddress": "user@example.com", "reason": "BOUNCE"}   (one object a line)
  JSON        [{"emailAddress": "user@example.com", "reason": "BOUNCE"}, ...]

Every record ends as either a valid Record or a Failure with its reason: nothing is dropped silently.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from postmesh.common.addresses import normalize_address
from postmesh.common.errors import InvalidArgument

CSV = "CSV"
JSON = "JSON"
PUT = "PUT"
DELETE = "DELETE"
REASONS = ("BOUNCE", "COMPLAINT")
_RAW_LIMIT = 200
_ADDRESS_NAMES = {"emailaddress", "email_address", "email address", "email", "address"}
_REASON_NAMES = {"reason"}


@dataclass(frozen=True)
class Record:
    number: int
    address: str
    reason: str


@dataclass(frozen=True)
class Failure:
    number: int
    raw: str
    error: str


class UnreadableFile(Exception):
    """The file as a whole cannot be read (the job fails with this message)."""


def _check(number: int, raw: str, address: object, reason: object, action: str) -> Record | Failure:
    if not isinstance(address, str) or not address.strip():
        return Failure(number, raw, "The record has no email address.")
    try:
        normalized = normalize_address(address.strip())
    except InvalidArgument as exc:
        return Failure(number, raw, str(exc))
    wanted = reason.strip().upper() if isinstance(reason, str) else ""
    if action == PUT and wanted not in REASONS:
        shown = json.dumps(reason) if reason is not None else "missing"
        return Failure(number, raw, f"The reason must be BOUNCE or COMPLAINT, not {shown}.")
    return Record(number, normalized, wanted if wanted in REASONS else "")


def _cut(raw: str) -> str:
    return raw if len(raw) <= _RAW_LIMIT else raw[: _RAW_LIMIT - 1] + "…"


def _csv_rows(text: str) -> Iterator[tuple[int, list[str] | None, str]]:
    """(line number, cells or None, error) for each CSV record."""
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        number = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield number, None, f"Malformed CSV: {exc}."
            continue
        yield number, row, ""


def _parse_csv(text: str, action: str) -> Iterator[Record | Failure]:
    address_column, reason_column = 0, 1
    first = True
    for number, row, error in _csv_rows(text):
        if row is None:
            yield Failure(number, "", error)
            continue
        if not any(cell.strip() for cell in row):
            continue
        raw = _cut(",".join(row))
        if first:
            first = False
            names = [cell.strip().lower() for cell in row]
            if names[0] in _ADDRESS_NAMES or any(n in _REASON_NAMES for n in names):
                address_column = next((i for i, n in enumerate(names) if n in _ADDRESS_NAMES), -1)
                reason_column = next((i for i, n in enumerate(names) if n in _REASON_NAMES), -1)
                if address_column < 0:
                    raise UnreadableFile("The CSV header has no emailAddress column.")
                continue
        address = row[address_column] if address_column < len(row) else None
        reason = row[reason_column] if 0 <= reason_column < len(row) else None
        yield _check(number, raw, address, reason, action)


def _object(number: int, raw: str, value: object, action: str) -> Record | Failure:
    if not isinstance(value, dict):
        return Failure(number, raw, "Each record must be a JSON object with emailAddress and reason.")
    address = next(
        (value[k] for k in ("emailAddress", "EmailAddress", "email_address", "email") if k in value), None
    )
    reason = next((value[k] for k in ("reason", "Reason") if k in value), None)
    return _check(number, raw, address, reason, action)


def _parse_json(text: str, action: str) -> Iterator[Record | Failure]:
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise UnreadableFile(f"Malformed JSON array: {exc}.") from None
        if not isinstance(values, list):
            raise UnreadableFile("A JSON file is one array of objects, or one object a line.")
        for number, value in enumerate(values, 1):
            yield _object(number, _cut(json.dumps(value)), value, action)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as exc:
            yield Failure(number, _cut(line), f"Malformed JSON: {exc}.")
            continue
        yield _object(number, _cut(line), value, action)


def parse(data: bytes, data_format: str, action: str) -> Iterator[Record | Failure]:
    """Each record of an import file, in order. Raises UnreadableFile when the file as a whole is."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"The file is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    if data_format == CSV:
        return _parse_csv(text, action)
    return _parse_json(text, action)


@dataclass(frozen=True)
class ExportRow:
    address: str
    reason: str
    updated_at: dt.datetime


def render(rows: Sequence[ExportRow], data_format: str) -> bytes:
    """The export file: CSV with a header row, or JSON Lines; both are import files too."""
    out = io.StringIO(newline="")
    if data_format == CSV:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["emailAddress", "reason", "lastUpdateTime"])
        for row in rows:
            writer.writerow([row.address, row.reason, row.updated_at.isoformat()])
    else:
        for row in rows:
            record = {
                "emailAddress": row.address,
                "reason": row.reason,
                "lastUpdateTime": row.updated_at.isoformat(),
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out.getvalue().encode()
