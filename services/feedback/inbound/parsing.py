"""From raw bytes to a Report: each format's parser in turn, most specific first. Never raises:
what nothing understands is a Report of kind NONE with the reason."""

from __future__ import annotations

import logging

from services.feedback.inbound import mimeparts
from services.feedback.inbound.arf import parse_arf, parse_forwarded_complaint
from services.feedback.inbound.autoreply import parse_auto_reply
from services.feedback.inbound.dsn import parse_dsn
from services.feedback.inbound.nonstandard import parse_nonstandard
from services.feedback.inbound.report import Kind, Report

log = logging.getLogger(__name__)


def parse_report(
    raw: bytes,
    *,
    null_sender: bool = True,
    to_feedback_loop: bool = False,
    own_addresses: set[str] | None = None,
) -> Report:
    """What `raw` reports. `null_sender`: it came with an empty envelope sender (as bounces do);
    `to_feedback_loop`: it was sent to the operator's feedback-loop address."""
    try:
        message = mimeparts.parse(raw)
        for attempt in (
            lambda: parse_arf(message),
            lambda: parse_dsn(message),
            lambda: parse_nonstandard(message, null_sender, own_addresses or set()),
            lambda: parse_auto_reply(message),
            lambda: parse_forwarded_complaint(message, to_feedback_loop),
        ):
            report = attempt()
            if report is not None:
                return report
    except Exception as exc:
        log.warning("unparseable report", extra={"error": repr(exc)})
        return Report(kind=Kind.NONE, format="none", reason=f"unparseable: {type(exc).__name__}")
    return Report(kind=Kind.NONE, format="none", reason="not a bounce, auto-reply or complaint")
