"""Micro-benchmark: `top_headers` (events' Mail.headers) of an accepted message, the email package's
compat32 parser (before) against the direct reading of plain header blocks (after), on the ~5 KB
SendEmail message and on a raw message whose header block is ~4.3 KB (a relay chain, DKIM and ARC
fields). CPU per call (time.process_time), min / median of the repeats: the machine is shared.

    .venv/bin/python benchmarks/micro_top_headers.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import statistics
import time
from collections.abc import Callable
from email import policy
from email.parser import BytesHeaderParser

from postmesh.common.mailheaders import MAX_HEADER_BYTES, top_headers
from postmesh.events.v1 import events_pb2
from services.sender.mime import Addressing, Body, Header, Mailbox, build_message

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
PARAGRAPH = (
    "Hello Ada,\n\nYour order 4711 has shipped and should arrive on Thursday. You can follow the\n"
    "parcel with the link below; the carrier updates it every few hours.\n\n"
)


def _send_email_message() -> bytes:
    """The ~5 KB text+HTML message of benchmarks/micro_dkim_mime.py."""
    text = PARAGRAPH * 13
    html = "".join(f"<p>{p}</p>\n" for p in text.split("\n\n") if p)
    addressing = Addressing(
        Mailbox("Example Shop", "orders@shop.example.test"), [Mailbox("Ada Lovelace", "ada@example.test")]
    )
    body = Body("Your order 4711 has shipped", text, html, headers=[Header("X-Campaign", "shipping")])
    return build_message(addressing, body, message_id="<bench@shop.example.test>", date=NOW)


def _raw_message() -> bytes:
    """A raw message with a ~5 KB header block: relays, authentication results, folded signatures."""
    lines = []
    for hop in range(12):
        lines.append(
            f"Received: from relay{hop}.example.test (relay{hop}.example.test [192.0.2.{hop}])\r\n"
            f"\tby mx{hop}.example.test (Postfix) with ESMTPS id 4Zx{hop:04d}Q\r\n"
            f"\tfor <ada@example.test>; Tue, 01 Dec 2026 13:5{hop % 10}:00 +0000 (UTC)"
        )
    lines.append(
        "Authentication-Results: mx.example.test; dkim=pass header.d=shop.example.test;\r\n"
        " spf=pass smtp.mailfrom=bounces.shop.example.test; dmarc=pass header.from=shop.example.test"
    )
    for name in ("ARC-Seal", "ARC-Message-Signature", "DKIM-Signature"):
        lines.append(
            f"{name}: v=1; a=rsa-sha256; c=relaxed/simple; d=shop.example.test; s=sel;\r\n"
            " h=from:to:subject:date:message-id:mime-version:content-type;\r\n"
            " bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
            f" b={'A' * 76}\r\n {'B' * 76}\r\n {'C' * 76}\r\n {'D' * 66}"
        )
    lines += [
        "From: Example Shop <orders@shop.example.test>",
        "To: Ada Lovelace <ada@example.test>",
        "Subject: Your order 4711 has shipped",
        "Date: Tue, 01 Dec 2026 13:50:00 +0000",
        "Message-ID: <raw-bench@shop.example.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "List-Unsubscribe: <mailto:unsubscribe@shop.example.test?subject=4711>,\r\n"
        " <https://shop.example.test/unsubscribe/4711>",
    ]
    return "\r\n".join(lines).encode("ascii") + b"\r\n\r\n" + PARAGRAPH.replace("\n", "\r\n").encode() * 13


def _email_package_top_headers(mime: bytes) -> tuple[list[events_pb2.Header], bool]:
    """top_headers before: the email package's compat32 parser for every message."""
    message = BytesHeaderParser(policy=policy.compat32).parsebytes(mime)
    headers: list[events_pb2.Header] = []
    used = 0
    for name, value in message.raw_items():
        text = str(value).replace("\r\n", "\n").replace("\n", "").strip()
        used += len(name) + len(text.encode("utf-8", "replace")) + 4
        if used > MAX_HEADER_BYTES:
            return headers, True
        headers.append(events_pb2.Header(name=name, value=text))
    return headers, False


def _spread(values: list[float]) -> str:
    return f"{min(values):8.1f} / {statistics.median(values):8.1f}"


def _per_call(run: Callable[[], object], number: int, repeat: int) -> list[float]:
    """CPU microseconds per call of each of `repeat` rounds of `number` calls."""
    rounds = []
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(number):
            run()
        rounds.append((time.process_time() - start) / number * 1e6)
    return rounds


def _headers(args: argparse.Namespace) -> None:
    number = 2000
    print(f"\ntop_headers, CPU µs per message, min / median of {args.repeat} x {number} calls")
    print(f"{'':44} {'before':>19} {'after':>19}")
    for label, mime in (
        ("SendEmail message (~5 KB, 10 fields)", _send_email_message()),
        ("raw message, ~5 KB header block", _raw_message()),
    ):
        assert top_headers(mime) == _email_package_top_headers(mime)
        head = mime[: mime.find(b"\r\n\r\n")]
        before = _per_call(functools.partial(_email_package_top_headers, mime), number, args.repeat)
        after = _per_call(functools.partial(top_headers, mime), number, args.repeat)
        print(f"{label + f' ({len(head)} B of headers)':44} {_spread(before):>19} {_spread(after):>19}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="rounds")
    _headers(parser.parse_args())


if __name__ == "__main__":
    main()
