"""Micro-benchmark of two per-message costs of the event loop of `postmesh serve all`, before and after:

1. DKIM signing (RSA-2048) through the delivery worker's `Signer`: on the loop (DKIM_SIGNING_THREADS=0,
   as before) against its thread pool (the default, 2). For each: CPU of the loop's thread per signed
   message (time.thread_time in the loop), CPU of the whole process per message, and the rate of
   `--concurrency` signings in flight at once through the loop (uvloop when installed).
2. `top_headers` (events' Mail.headers) of an accepted message: the email package's compat32 parser
   (before) against the direct reading of plain header blocks (after), on the ~5 KB SendEmail message
   and on a raw message whose header block is ~5 KB (a relay chain, DKIM and ARC fields).

    .venv/bin/python benchmarks/micro_loop_hot_path.py [--messages 400] [--concurrency 16] [--repeat 7]

The machine is shared and noisy: each figure is printed as min / median of the repeats."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import statistics
import time
from collections.abc import Callable
from email import policy
from email.parser import BytesHeaderParser

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postmesh.common.eventloop import loop_factory, resolve
from postmesh.common.mailheaders import MAX_HEADER_BYTES, top_headers
from postmesh.events.v1 import events_pb2
from services.sender.dkim_signing import RSA_SHA256, Signer, SigningConfig, SigningKey
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


def _loop_work(iterations: int) -> int:
    """Pure Python on the loop (an interpreter loop, which yields the GIL when asked, as the rest of a
    message's handling does)."""
    total = 0
    for i in range(iterations):
        total += i
    return total


def _iterations_for(microseconds: float) -> int:
    """How many `_loop_work` iterations take `microseconds` of CPU here."""
    if microseconds <= 0:
        return 0
    start = time.thread_time()
    _loop_work(1_000_000)
    return int(1_000_000 * microseconds / ((time.thread_time() - start) * 1e6))


async def _signing_round(
    signer: Signer, mime: bytes, config: SigningConfig, messages: int, concurrency: int, work: int
) -> tuple[float, float, float]:
    """(loop-thread CPU µs per message, process CPU µs per message, messages per second) of
    `messages` messages, `concurrency` of them in flight at once, each `work` iterations of other
    loop work and a signature."""
    queue = list(range(messages))

    async def worker() -> None:
        while queue:
            queue.pop()
            _loop_work(work)
            await signer.sign(mime, config)

    thread_start, process_start, wall_start = time.thread_time(), time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall_start
    thread_cpu, process_cpu = time.thread_time() - thread_start, time.process_time() - process_start
    return thread_cpu / messages * 1e6, process_cpu / messages * 1e6, messages / wall


async def _busy_round(
    signer: Signer, mime: bytes, config: SigningConfig, signers: int, seconds: float
) -> tuple[float, float]:
    """(signatures per second, steps of other loop work per second) while the loop is kept busy by
    work of its own (four tasks of 50 µs steps, as accepting mail would keep it) and `signers`
    tasks sign one message after another (yielding to the loop between two)."""
    stop = time.perf_counter() + seconds
    work = _iterations_for(50)
    steps = signed = 0

    async def busy() -> None:
        nonlocal steps
        while time.perf_counter() < stop:
            _loop_work(work)
            steps += 1
            await asyncio.sleep(0)

    async def sign() -> None:
        nonlocal signed
        while time.perf_counter() < stop:
            await signer.sign(mime, config)
            signed += 1
            await asyncio.sleep(0)

    await asyncio.gather(*(busy() for _ in range(4)), *(sign() for _ in range(signers)))
    return signed / seconds, steps / seconds


def _signing(args: argparse.Namespace) -> None:
    mime = _send_email_message()
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    config = SigningConfig("shop.example.test", (SigningKey("sel", RSA_SHA256, pem.decode()),))

    async def measure(threads: int, work: int) -> list[tuple[float, float, float]]:
        signer = Signer(threads)
        try:
            await _signing_round(signer, mime, config, 50, args.concurrency, work)  # warm: key, pool
            return [
                await _signing_round(signer, mime, config, args.messages, args.concurrency, work)
                for _ in range(args.repeat)
            ]
        finally:
            signer.close()

    loop_name = resolve(args.loop)
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        for other in (0.0, args.other_work_us):
            work = _iterations_for(other)
            print(
                f"\nDKIM RSA-2048 through the {loop_name} loop: {len(mime)}-byte message, {args.messages}"
                f" messages, {args.concurrency} in flight, each with {other:.0f} µs of other loop work;"
                f" min / median of {args.repeat}"
            )
            print(f"{'':34} {'loop CPU µs/msg':>19} {'process CPU µs/msg':>19} {'messages/s':>19}")
            for label, threads in (
                ("on the loop (before, threads=0)", 0),
                ("signing pool (after, threads=2)", 2),
            ):
                rows = runner.run(measure(threads, work))
                loop_cpu, process_cpu, rate = ([row[i] for row in rows] for i in range(3))
                print(f"{label:34} {_spread(loop_cpu):>19} {_spread(process_cpu):>19} {_spread(rate):>19}")

        async def busy(threads: int, signers: int) -> list[tuple[float, float]]:
            signer = Signer(threads)
            try:
                return [await _busy_round(signer, mime, config, signers, 1.0) for _ in range(args.repeat)]
            finally:
                signer.close()

        print(
            f"\nThe loop busy with work of its own (50 µs steps) while {args.concurrency} tasks sign, 1 s"
            f" rounds; min / median of {args.repeat}"
        )
        print(f"{'':34} {'signatures/s':>19} {'loop work steps/s':>19}")
        for label, threads, signers in (
            ("no signing", 0, 0),
            ("on the loop (before, threads=0)", 0, args.concurrency),
            ("signing pool (after, threads=2)", 2, args.concurrency),
        ):
            rows2 = runner.run(busy(threads, signers))
            rate, steps = ([row[i] for row in rows2] for i in range(2))
            print(f"{label:34} {_spread(rate):>19} {_spread(steps):>19}")


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
    parser.add_argument("--messages", type=int, default=400, help="signed messages per round")
    parser.add_argument("--concurrency", type=int, default=16, help="signings in flight (DELIVERY_WORKERS)")
    parser.add_argument("--repeat", type=int, default=7, help="rounds")
    parser.add_argument("--loop", default="auto", help="EVENT_LOOP: asyncio, uvloop or auto")
    parser.add_argument(
        "--other-work-us", type=float, default=1000.0, help="the rest of a message's loop CPU (second run)"
    )
    args = parser.parse_args()
    _signing(args)
    _headers(args)


if __name__ == "__main__":
    main()
