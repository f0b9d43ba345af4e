"""SMTP PIPELINING (RFC 2920) in the delivery transport: every combination of replies gives each
recipient the outcome the one-by-one path gives it, a session out of step is never reused, and the
message data is dot-stuffed as aiosmtplib stuffs it. Real aiosmtpd servers (and Debian's Postfix)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import ssl
import tempfile
import time
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postmesh import benchpeer
from postmesh.common import certs
from postmesh.testing_mail import Behaviour, SmtpServer
from services.sender.transport import (
    DELAY_COMMUNICATION,
    Destination,
    Envelope,
    Kind,
    Outcome,
    SmtpOptions,
    SmtpPool,
    SmtpTransport,
    _Connection,
    _ReplyReader,
    data_payload,
)

MESSAGE = (
    b"From: news@b.test\r\nTo: a@ok.test\r\nSubject: pipelining\r\n"
    b"Message-ID: <pipelining@b.test>\r\n\r\nHello.\r\n.\r\n..two dots\r\n.leading dot\r\nend\r\n"
)
THREE = ("a@ok.test", "b@ok.test", "c@ok.test")


def _envelope(*recipients: str, message_id: str = "m1") -> Envelope:
    return Envelope(
        message_id=message_id,
        mail_from="bounce@b.test",
        recipients=recipients,
        domain="ok.test",
        require_tls=False,
    )


def _transport(port: int, **options: object) -> SmtpTransport:
    values: dict[str, object] = {"helo_name": "postmesh.test", "timeout": 20.0}
    values.update(options)
    return SmtpTransport(SmtpPool(SmtpOptions(**values)), smarthost=("127.0.0.1", port))  # type: ignore[arg-type]


def _idle(transport: SmtpTransport) -> int:
    return sum(len(v) for v in transport.pool._idle.values())


def _comparable(outcome: Outcome) -> tuple[str, ...]:
    """What must match between the two paths: a failure's text names the exception, which differs."""
    text = "" if outcome.delay_type == DELAY_COMMUNICATION else outcome.response
    return outcome.kind.value, outcome.status, outcome.delay_type, text


@dataclasses.dataclass
class Run:
    outcomes: dict[str, Outcome]
    received: list[tuple[list[str], bytes]]
    kept: bool  # the session went back to the pool
    pipelined: bool


class _Pool(SmtpPool):
    """Notes whether each session it opens was offered PIPELINING."""

    def __init__(self, options: SmtpOptions) -> None:
        super().__init__(options)
        self.pipelining: list[bool] = []

    async def _open(self, dest: Destination, require_tls: bool, *, try_tls: bool = True) -> _Connection:
        conn = await super()._open(dest, require_tls, try_tls=try_tls)
        self.pipelining.append(conn.smtp.supports_extension("pipelining"))
        return conn


async def _deliver(
    behaviour: Behaviour,
    recipients: tuple[str, ...],
    *,
    pipelining: bool,
    data: bytes = MESSAGE,
) -> Run:
    with SmtpServer(behaviour=dataclasses.replace(behaviour, pipelining=pipelining)) as server:
        pool = _Pool(SmtpOptions(helo_name="postmesh.test", timeout=20.0))
        transport = SmtpTransport(pool, smarthost=("127.0.0.1", server.port))
        outcomes = await transport.deliver(_envelope(*recipients), data)
        kept = _idle(transport) == 1
        await transport.close()
        received = [(r.recipients, r.data) for r in server.received]
    assert set(outcomes) == set(recipients)
    return Run(outcomes, received, kept, pool.pipelining == [True])


async def _both(behaviour: Behaviour, recipients: tuple[str, ...] = THREE, **kwargs: object) -> Run:
    """Delivers with and without PIPELINING; asserts the outcomes and what arrived agree."""
    piped = await _deliver(behaviour, recipients, pipelining=True, **kwargs)  # type: ignore[arg-type]
    plain = await _deliver(behaviour, recipients, pipelining=False, **kwargs)  # type: ignore[arg-type]
    assert piped.pipelined and not plain.pipelined
    assert {r: _comparable(o) for r, o in piped.outcomes.items()} == {
        r: _comparable(o) for r, o in plain.outcomes.items()
    }
    assert piped.received == plain.received
    return piped


def _kinds(run: Run) -> dict[str, Kind]:
    return {r: o.kind for r, o in run.outcomes.items()}


async def test_all_recipients_accepted_one_message_and_the_session_is_kept() -> None:
    run = await _both(Behaviour())
    assert set(_kinds(run).values()) == {Kind.DELIVERED}
    assert run.outcomes["a@ok.test"].response == "250 2.0.0 OK queued"
    assert run.received == [(list(THREE), MESSAGE)]
    assert run.kept


async def test_some_recipients_refused_each_keeps_its_own_reply() -> None:
    behaviour = Behaviour(
        reject={"b@ok.test": "550 5.1.1 <b@ok.test>: user unknown", "c@ok.test": "452 4.2.2 mailbox full"}
    )
    run = await _both(behaviour)
    assert _kinds(run) == {
        "a@ok.test": Kind.DELIVERED,
        "b@ok.test": Kind.PERMANENT,
        "c@ok.test": Kind.TRANSIENT,
    }
    assert (
        run.outcomes["b@ok.test"].status == "5.1.1" and run.outcomes["c@ok.test"].delay_type == "MailboxFull"
    )
    assert run.received == [(["a@ok.test"], MESSAGE)]
    assert run.kept


async def test_every_recipient_refused_sends_no_data_and_keeps_the_session() -> None:
    run = await _both(Behaviour(reject_all_rcpt="550 5.7.1 relaying denied"))
    assert set(_kinds(run).values()) == {Kind.PERMANENT}
    assert run.received == []
    assert run.kept  # DATA's 503 was read, then RSET: the session is in step


async def test_data_accepted_without_recipients_is_ended_by_a_lone_dot_and_the_session_closed() -> None:
    run = await _both(Behaviour(reject_all_rcpt="550 5.1.1 unknown", data_without_recipients=True))
    assert set(_kinds(run).values()) == {Kind.PERMANENT}
    assert run.received == []
    assert not run.kept


@pytest.mark.parametrize(
    ("reply", "kind"), [("550 5.7.1 sender refused", Kind.PERMANENT), ("451 4.7.1 later", Kind.TRANSIENT)]
)
async def test_a_refused_sender_gives_every_recipient_its_reply(reply: str, kind: Kind) -> None:
    run = await _both(Behaviour(reject_mail=reply))
    assert {o.response for o in run.outcomes.values()} == {reply}
    assert set(_kinds(run).values()) == {kind}
    assert run.received == []
    assert run.kept  # the RCPTs' and DATA's 503s were all read


async def test_a_refused_data_command_is_the_accepted_recipients_outcome() -> None:
    behaviour = Behaviour(reject={"c@ok.test": "550 5.1.1 unknown"}, reject_data="554 5.6.0 no thanks")
    run = await _both(behaviour)
    assert run.outcomes["a@ok.test"].response == "554 5.6.0 no thanks"
    assert _kinds(run) == {
        "a@ok.test": Kind.PERMANENT,
        "b@ok.test": Kind.PERMANENT,
        "c@ok.test": Kind.PERMANENT,
    }
    assert run.outcomes["c@ok.test"].status == "5.1.1"
    assert run.received == []
    assert run.kept


async def test_a_deferred_message_is_transient_for_the_accepted_recipients() -> None:
    run = await _both(Behaviour(defer_first=1, reject={"b@ok.test": "550 5.1.1 unknown"}))
    assert _kinds(run) == {
        "a@ok.test": Kind.TRANSIENT,
        "b@ok.test": Kind.PERMANENT,
        "c@ok.test": Kind.TRANSIENT,
    }
    assert run.outcomes["a@ok.test"].status == "4.3.0"
    assert run.kept


@pytest.mark.parametrize(("hang_up_at", "hang_up_rcpt"), [("MAIL", ""), ("RCPT", ""), ("RCPT", "c@ok.test")])
async def test_a_server_gone_before_data_leaves_every_recipient_to_retry(
    hang_up_at: str, hang_up_rcpt: str
) -> None:
    behaviour = Behaviour(
        hang_up_at=hang_up_at, hang_up_rcpt=hang_up_rcpt, reject={"b@ok.test": "550 5.1.1 x"}
    )
    run = await _both(behaviour)
    assert {o.delay_type for o in run.outcomes.values()} == {DELAY_COMMUNICATION}
    assert run.received == []
    assert not run.kept


@pytest.mark.parametrize("hang_up_at", ["DATA", "END"])
async def test_a_server_gone_during_data_retries_the_accepted_and_keeps_the_refusals(hang_up_at: str) -> None:
    run = await _both(Behaviour(hang_up_at=hang_up_at, reject={"b@ok.test": "550 5.1.1 unknown"}))
    assert run.outcomes["b@ok.test"].kind is Kind.PERMANENT
    for accepted in ("a@ok.test", "c@ok.test"):
        outcome = run.outcomes[accepted]
        assert outcome.kind is Kind.TRANSIENT and outcome.delay_type == DELAY_COMMUNICATION
        assert "connection lost during DATA" in outcome.response
    assert run.received == []
    assert not run.kept


async def test_a_reply_that_never_comes_closes_the_session_and_the_next_message_is_not_confused() -> None:
    # The server answers b's RCPT 5 s late; the client waits 1 s. Its late replies must not be read
    # as the next message's.
    behaviour = Behaviour(slow_rcpt={"b@ok.test": 5.0}, pipelining=True)
    with SmtpServer(behaviour=behaviour) as server:
        transport = _transport(server.port, timeout=1.0)
        first = await transport.deliver(_envelope(*THREE), MESSAGE)
        assert {o.delay_type for o in first.values()} == {DELAY_COMMUNICATION}
        assert _idle(transport) == 0
        behaviour.slow_rcpt.clear()
        transport.pool.options = dataclasses.replace(transport.pool.options, timeout=20.0)
        behaviour.reject["x@ok.test"] = "550 5.1.1 unknown"
        second = await transport.deliver(_envelope("x@ok.test", "y@ok.test", message_id="m2"), MESSAGE)
        assert second["x@ok.test"].kind is Kind.PERMANENT and second["y@ok.test"].kind is Kind.DELIVERED
        await transport.close()
        assert [r.recipients for r in server.received] == [["y@ok.test"]]


async def test_one_session_carries_messages_after_refusals_in_step() -> None:
    behaviour = Behaviour(pipelining=True, reject={"no@ok.test": "550 5.1.1 unknown"})
    with SmtpServer(behaviour=behaviour) as server:
        transport = _transport(server.port)
        envelopes = [
            _envelope("a@ok.test", "no@ok.test", message_id="m1"),
            _envelope("no@ok.test", message_id="m2"),
            _envelope("b@ok.test", message_id="m3"),
            _envelope("no@ok.test", "c@ok.test", "d@ok.test", message_id="m4"),
        ]
        for envelope in envelopes:
            outcomes = await transport.deliver(envelope, MESSAGE)
            for recipient, outcome in outcomes.items():
                assert outcome.kind is (Kind.PERMANENT if recipient == "no@ok.test" else Kind.DELIVERED)
        assert _idle(transport) == 1
        conn = transport.pool._idle[next(iter(transport.pool._idle))][0]
        assert conn.messages == len(envelopes)
        await transport.close()
        assert [r.recipients for r in server.received] == [
            ["a@ok.test"],
            ["b@ok.test"],
            ["c@ok.test", "d@ok.test"],
        ]


async def test_pipelining_over_starttls_and_the_session_reused(tmp_path: Path) -> None:
    cert, key = certs.pem(*certs.self_signed(["127.0.0.1"]))
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    with SmtpServer(behaviour=Behaviour(pipelining=True), tls_context=context) as server:
        transport = _transport(server.port, tls_mode="starttls")
        for n in range(3):
            outcomes = await transport.deliver(
                _envelope("a@ok.test", "b@ok.test", message_id=f"m{n}"), MESSAGE
            )
            assert set(o.kind for o in outcomes.values()) == {Kind.DELIVERED}
        assert _idle(transport) == 1
        await transport.close()
        received = server.received
        assert len(received) == 3 and all(r.tls and r.data == MESSAGE for r in received)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b".",
        b"..\r\n",
        b".\r\n.\r\n",
        b"a\r\n.b\r\n..c\r\n.",
        b"no newline at the end",
        b"lone\nline\rfeeds\r\n.mixed\n.\r.x",
        b"\r\n\r\n.\r\n",
        MESSAGE,
    ],
)
def test_data_payload_stuffs_as_aiosmtplib_does(body: bytes) -> None:
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"
    assert data_payload(body) == expected


async def test_dot_stuffed_data_arrives_unchanged() -> None:
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n. \r\n.x\r\nx.\r\n...\r\nlast line\r\n"
    run = await _both(Behaviour(), ("a@ok.test",), data=body)
    assert run.received == [(["a@ok.test"], body)]


def _reader_fed(chunks: list[bytes]) -> _ReplyReader:
    reader = _ReplyReader(1.0)
    for chunk in chunks:
        reader.data_received(chunk)
    return reader


async def test_replies_are_read_in_order_however_the_bytes_arrive() -> None:
    wire = b"250 2.1.0 ok\r\n550-5.1.1 no\r\n550 5.1.1 such user\r\n250 ok\r\n354 go\r\n"
    expected = [(250, "2.1.0 ok"), (550, "5.1.1 no\n5.1.1 such user"), (250, "ok"), (354, "go")]
    for chunks in ([wire], [wire[i : i + 1] for i in range(len(wire))], [wire[:20], wire[20:41], wire[41:]]):
        reader = _reader_fed(chunks)
        assert [tuple(await reader.read()) for _ in expected] == expected
        assert reader.idle


async def test_a_malformed_or_missing_reply_is_an_error_and_a_421_ends_the_session() -> None:
    garbled = _reader_fed([b"250 ok\r\nhello\r\n"])
    assert (await garbled.read()).code == 250
    with pytest.raises(aiosmtplib.SMTPResponseException):
        await garbled.read()
    with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
        await _reader_fed([b"250-more to come\r\n"]).read()
    closing = _reader_fed([b"421 4.4.2 bye\r\n250 ok\r\n"])
    assert (await closing.read()).code == 421
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await closing.read()


def _postfix_usable() -> str:
    return benchpeer.missing()


@pytest.mark.skipif(bool(_postfix_usable()), reason=_postfix_usable() or "postfix")
async def test_delivery_into_postfix_pipelined() -> None:
    base = Path(tempfile.mkdtemp(prefix="postmesh-pipelining-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with SmtpServer() as sink:
        peer = benchpeer.PostfixPeer(
            base / "postfix", sink_port=sink.port, key_pem=key_pem, domain="b.test", selector="s1"
        )
        try:
            await asyncio.to_thread(peer.start)
            transport = _transport(peer.port)
            bodies = [MESSAGE.replace(b"pipelining@", f"pipelining-{n}@".encode()) for n in range(3)]
            for n, body in enumerate(bodies):
                outcomes = await transport.deliver(
                    _envelope("a@ok.test", "b@other.test", message_id=f"m{n}"), body
                )
                assert set(o.kind for o in outcomes.values()) == {Kind.DELIVERED}, (outcomes, peer.log_tail())
                assert all(o.response.startswith("250 2.0.0 Ok: queued") for o in outcomes.values())
            conn = transport.pool._idle[next(iter(transport.pool._idle))][0]
            assert conn.smtp.supports_extension("pipelining") and conn.messages == 3
            await transport.close()
            deadline = time.monotonic() + 120
            while len({r.message_id for r in sink.received}) < 3:
                assert time.monotonic() < deadline, peer.log_tail()
                await asyncio.sleep(0.2)
            for body in bodies:
                arrived = next(r for r in sink.received if r.message_id in body.decode())
                # Postfix and OpenDKIM add headers; the dot-stuffed body comes through unchanged.
                assert arrived.data.split(b"\r\n\r\n", 1)[1] == body.split(b"\r\n\r\n", 1)[1]
                assert re.search(rb"^Subject: pipelining\r$", arrived.data, re.M)
        finally:
            await asyncio.to_thread(peer.stop)
            shutil.rmtree(base, ignore_errors=True)


async def test_a_pooled_session_the_server_dropped_is_retried_fresh_without_a_loss() -> None:
    behaviour = Behaviour(pipelining=True)
    with SmtpServer(behaviour=behaviour) as first:
        port = first.port
        pool = _Pool(SmtpOptions(helo_name="postmesh.test", timeout=20.0))
        transport = SmtpTransport(pool, smarthost=("127.0.0.1", port))
        assert (await transport.deliver(_envelope("a@ok.test"), MESSAGE))["a@ok.test"].kind is Kind.DELIVERED
        assert _idle(transport) == 1
    # The server went away (and came back): the pooled session's pipelined MAIL finds it closed.
    with SmtpServer(port=port, behaviour=behaviour) as second:
        outcomes = await transport.deliver(_envelope("b@ok.test", "c@ok.test", message_id="m2"), MESSAGE)
        assert {o.kind for o in outcomes.values()} == {Kind.DELIVERED}
        await transport.close()
        assert [r.recipients for r in second.received] == [["b@ok.test", "c@ok.test"]]
    assert pool.pipelining == [True, True]  # the stale session was given up, a fresh one opened
