"""Micro-benchmark of two per-message costs of the event loop of `postmesh serve all`:

1. DKIM signing (RSA-2048) through the delivery worker's `Signer`: on the loop (DKIM_SIGNING_THREADS=0,
   the default and what was there before), its thread pool (2 threads: only the RSA operation goes to
   a thread), and a prototype of a helper process doing the RSA operation over pipes (not in postmesh).
   Three cases:
   - `--concurrency` signings in flight and nothing else: CPU of the loop's thread per signed message
     (time.thread_time in the loop), CPU of this process (and of the prototype's helper) per
     message, messages per second;
   - the same with `--other-work-us` of pure Python loop work per message before its signature;
   - the loop kept busy by work of its own (as accepting mail keeps it) while `--concurrency` tasks
     sign: signatures per second and how much of its own work the loop still gets done. This is where
     the threads starve: each needs the GIL back after a signature, and a loop that never waits gives
     it up only at the interpreter's forced switch (every 5 ms).
2. `top_headers` (events' Mail.headers) of an accepted message: the email package's compat32 parser
   (before) against the direct reading of plain header blocks (after), on the ~5 KB SendEmail message
   and on a raw message whose header block is ~4.3 KB (a relay chain, DKIM and ARC fields).

    .venv/bin/python benchmarks/micro_loop_hot_path.py [--messages 400] [--concurrency 16] [--repeat 7]

The machine is shared and noisy: each figure is printed as min / median of the repeats."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import statistics
import struct
import sys
import time
from collections.abc import Callable
from email import policy
from email.parser import BytesHeaderParser

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postmesh.bench_proc import cpu_seconds
from postmesh.common.eventloop import loop_factory, resolve
from postmesh.common.mailheaders import MAX_HEADER_BYTES, top_headers
from postmesh.events.v1 import events_pb2
from services.sender import dkim_direct
from services.sender.dkim_signing import RSA_SHA256, Signer, SigningConfig, SigningKey, _inputs, sign_message
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


# A prototype, not postmesh code: RSA operations in a helper process (its own GIL), over pipes. Frames
# to it: id (u32), PEM length (u16), PEM, SHA-256 digest; from it: id, signature length, signature.
_CHILD = """
import functools, struct, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
key = functools.lru_cache(maxsize=64)(lambda pem: serialization.load_pem_private_key(pem, None))
pad, alg, inp, out = padding.PKCS1v15(), Prehashed(hashes.SHA256()), sys.stdin.buffer, sys.stdout.buffer
while len(head := inp.read(6)) == 6:
    ident, size = struct.unpack(">IH", head)
    pem = inp.read(size)
    signature = key(pem).sign(inp.read(32), pad, alg)
    out.write(struct.pack(">IH", ident, len(signature)) + signature)
    out.flush()
"""


class _ProcessSigner(Signer):
    """Signer's direct path with the RSA operation in `processes` helper processes (prototype)."""

    def __init__(self, processes: int) -> None:
        super().__init__(0)
        self._count = processes
        self._children: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[None]] = []
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._sent = 0

    async def _start(self) -> None:
        for _ in range(self._count):
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            self._children.append(child)
            self._readers.append(asyncio.create_task(self._read(child)))

    async def _read(self, child: asyncio.subprocess.Process) -> None:
        assert child.stdout is not None
        while True:
            ident, size = struct.unpack(">IH", await child.stdout.readexactly(6))
            self._waiting.pop(ident).set_result(await child.stdout.readexactly(size))

    async def sign(self, mime: bytes, config: SigningConfig) -> bytes:
        if not self._children:
            await self._start()
        fields = []
        for inputs in _inputs(config):
            unsigned = dkim_direct.prepare(mime, **inputs)
            assert unsigned is not None
            self._sent += 1
            child = self._children[self._sent % len(self._children)]
            assert child.stdin is not None
            pem = inputs["private_key_pem"]
            child.stdin.write(struct.pack(">IH", self._sent, len(pem)) + pem + unsigned.digest)
            self._waiting[self._sent] = waiting = asyncio.get_running_loop().create_future()
            fields.append(unsigned.field(await waiting))
        return b"".join(fields) + mime

    def helpers(self) -> list[int]:
        return [child.pid for child in self._children]

    async def aclose(self) -> None:
        for reader in self._readers:
            reader.cancel()
        for child in self._children:
            assert child.stdin is not None
            child.stdin.close()
            await child.wait()
        self._children, self._readers = [], []


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

    def cpu() -> float:  # this process's, and its helper processes' (the prototype's) while they live
        helpers = signer.helpers() if isinstance(signer, _ProcessSigner) else []
        return time.process_time() + sum(cpu_seconds(pid) for pid in helpers)

    thread_start, process_start, wall_start = time.thread_time(), cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall_start
    thread_cpu, process_cpu = time.thread_time() - thread_start, cpu() - process_start
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

    def signer_for(threads: int) -> Signer:
        return _ProcessSigner(-threads) if threads < 0 else Signer(threads)

    async def done(signer: Signer) -> None:
        signer.close()
        if isinstance(signer, _ProcessSigner):
            await signer.aclose()

    async def measure(threads: int, work: int) -> list[tuple[float, float, float]]:
        signer = signer_for(threads)
        try:
            await _signing_round(signer, mime, config, 50, args.concurrency, work)  # warm: key, pool
            for _ in range(3):  # the same bytes as sign_message's (t= is the second: it may tick)
                if await signer.sign(mime, config) == sign_message(mime, config):
                    break
            else:
                raise AssertionError("not sign_message's bytes")
            return [
                await _signing_round(signer, mime, config, args.messages, args.concurrency, work)
                for _ in range(args.repeat)
            ]
        finally:
            await done(signer)

    loop_name = resolve(args.loop)
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        for other in (0.0, args.other_work_us):
            work = _iterations_for(other)
            print(
                f"\nDKIM RSA-2048 through the {loop_name} loop: {len(mime)}-byte message, {args.messages}"
                f" messages, {args.concurrency} in flight, each with {other:.0f} µs of other loop work;"
                f" min / median of {args.repeat}"
            )
            print(f"{'':34} {'loop CPU µs/msg':>19} {'all CPU µs/msg':>19} {'messages/s':>19}")
            for label, threads in (
                ("on the loop (threads=0, default)", 0),
                ("signing pool (threads=2)", 2),
                ("prototype: 1 signing process", -1),
            ):
                rows = runner.run(measure(threads, work))
                loop_cpu, process_cpu, rate = ([row[i] for row in rows] for i in range(3))
                print(f"{label:34} {_spread(loop_cpu):>19} {_spread(process_cpu):>19} {_spread(rate):>19}")

        async def busy(threads: int, signers: int) -> list[tuple[float, float]]:
            signer = signer_for(threads)
            try:
                return [await _busy_round(signer, mime, config, signers, 1.0) for _ in range(args.repeat)]
            finally:
                await done(signer)

        print(
            f"\nThe loop busy with work of its own (50 µs steps) while {args.concurrency} tasks sign, 1 s"
            f" rounds; min / median of {args.repeat}"
        )
        print(f"{'':34} {'signatures/s':>19} {'loop work steps/s':>19}")
        for label, threads, signers in (
            ("no signing", 0, 0),
            ("on the loop (threads=0, default)", 0, args.concurrency),
            ("signing pool (threads=2)", 2, args.concurrency),
            ("prototype: 1 signing process", -1, args.concurrency),
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
