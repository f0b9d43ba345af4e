"""Returned mail as real MTAs and mailbox providers write it, and a client that hands it to the
feedback service's inbound SMTP listener."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable
from typing import TypeVar

from postmesh.testing import MeshThread

T = TypeVar("T")


def inbound_port(mesh: MeshThread) -> int:
    assert mesh.server is not None
    inbound = mesh.server.services["feedback"].inbound  # type: ignore[attr-defined]
    assert inbound is not None and inbound.listener is not None
    return int(inbound.listener.port)


def deliver(port: int, mail_from: str, rcpt_to: list[str], data: bytes) -> tuple[int, bytes]:
    """Sends `data` to the listener as an MTA would (STARTTLS when offered); the reply to DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("mx.remote.test")
        if smtp.has_extn("starttls"):
            import ssl

            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            smtp.starttls(context=context)
            smtp.ehlo("mx.remote.test")
        smtp.mail(mail_from)
        for rcpt in rcpt_to:
            code, reply = smtp.rcpt(rcpt)
            if code >= 400:
                return code, reply
        smtp.putcmd("data")
        code, reply = smtp.getreply()
        if code != 354:
            return code, reply
        smtp.send(
            smtplib.quotedata(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
        )
        smtp.send(b"\r\n.\r\n")
        return smtp.getreply()


def postfix_dsn(
    *,
    return_path: str,
    recipient: str,
    status: str,
    diagnostic: str,
    original: bytes,
    action: str = "failed",
    reporting_mta: str = "mx.remote.test",
) -> bytes:
    """A DSN the way Postfix's bounce daemon writes it (RFC 3464, with the original headers)."""
    headers = original.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    return (
        f"Return-Path: <>\r\n"
        f"From: MAILER-DAEMON@{reporting_mta} (Mail Delivery System)\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"To: {return_path}\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\r\n'
        f"Message-Id: <20261201.1234@{reporting_mta}>\r\n\r\n"
        f"This is a MIME-encapsulated message.\r\n\r\n"
        f"--B1\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"This is the mail system at host {reporting_mta}.\r\n\r\n"
        f"I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more "
        f"recipients.\r\n\r\n<{recipient}>: {diagnostic}\r\n\r\n"
        f"--B1\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; {reporting_mta}\r\nArrival-Date: Tue,  1 Dec 2026 04:00:00 +0000 (UTC)\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\nRemote-MTA: dns; mailstore.remote.test [127.0.0.9]\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n\r\n"
        f"--B1\r\nContent-Description: Undelivered Message Headers\r\n"
        f"Content-Type: text/rfc822-headers\r\n\r\n"
        f"{headers}\r\n\r\n--B1--\r\n"
    ).encode()


def arf_report(
    *,
    original: bytes,
    recipient: str,
    feedback_type: str = "abuse",
    user_agent: str = "Yahoo!-Mail-Feedback/2.0",
) -> bytes:
    """An ARF report (RFC 5965) with the whole original message attached."""
    return (
        (
            "From: <staff@hotmail.example>\r\nDate: Tue, 1 Dec 2026 04:05:00 +0000\r\n"
            "Subject: FW: Earn money\r\nTo: <fbl@bounces.postmesh.test>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=feedback-report; boundary="part1"\r\n\r\n'
            '--part1\r\nContent-Type: text/plain; charset="US-ASCII"\r\n\r\n'
            "This is an email abuse report for an email message received from IP 127.0.0.2 on "
            "Tue, 1 Dec 2026 04:00:00 +0000.\r\n\r\n"
            "--part1\r\nContent-Type: message/feedback-report\r\n\r\n"
            f"Feedback-Type: {feedback_type}\r\nUser-Agent: {user_agent}\r\nVersion: 1\r\n"
            "Original-Mail-From: <somespammer@example.net>\r\n"
            f"Original-Rcpt-To: <{recipient}>\r\nArrival-Date: Tue, 1 Dec 2026 04:00:00 +0000\r\n"
            "Reporting-MTA: dns; mail.hotmail.example\r\nSource-IP: 127.0.0.2\r\n\r\n"
            "--part1\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        ).encode()
        + original.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        + b"\r\n--part1--\r\n"
    )


def eventually(probe: Callable[[], T | None], *, within: float = 60.0, what: str = "condition") -> T:
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within} s")
        time.sleep(0.2)
