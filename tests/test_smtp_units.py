"""The SMTP server's pure parts: option headers, the error-to-reply table, the credential cache, the
connection gate, and `postmesh dev`'s certificate."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postmesh.cli.server import _dev_smtp
from postmesh.common.config import load_settings
from postmesh.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PostmeshError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from postmesh.common.server import load_all_service_settings
from services.sender.smtp.credentials import SmtpCredentials
from services.sender.smtp.options import split_options
from services.sender.smtp.replies import reply_for
from services.sender.smtp.server import ConnectionGate, Limits, submission_request

# --- Option headers.

_OPTION_NAMES = [
    f"{prefix}{name}"
    for prefix in ("X-SES-", "x-ses-", "X-Postmesh-")
    for name in ("CONFIGURATION-SET", "Message-Tags", "SOURCE-ARN", "FROM-ARN", "RETURN-PATH-ARN")
]
_field_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z")
_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def test_options_are_read_and_removed_and_the_rest_is_untouched() -> None:
    data = (
        b"From: a@example.test\r\nX-SES-CONFIGURATION-SET: marketing\r\nSubject: hi\r\n"
        b"X-Postmesh-Message-Tags: campaign=spring,\r\n kind=news\r\n"
        b"X-SES-FROM-ARN: arn:aws:ses:us-east-1:123456789012:identity/example.test\r\n\r\n"
        b"X-SES-CONFIGURATION-SET: in the body stays\r\n"
    )
    options, raw = split_options(data)
    assert options.configuration_set == "marketing"
    assert options.tags == [("campaign", "spring"), ("kind", "news")]
    assert options.identity == "arn:aws:ses:us-east-1:123456789012:identity/example.test"
    assert raw == (
        b"From: a@example.test\r\nSubject: hi\r\n\r\nX-SES-CONFIGURATION-SET: in the body stays\r\n"
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"From: a@x.test\r\nbcc evil@x.test\r\n\r\nbody", "Malformed header line"),
        (
            b"From: a@x.test\r\nX-SES-SOURCE-ARN: a.test\r\nX-SES-FROM-ARN: b.test\r\n\r\n",
            "different identities",
        ),
        (b"From: a@x.test\r\nX-SES-MESSAGE-TAGS: novalue\r\n\r\n", "not name=value"),
        (
            b"From: a@x.test\r\nX-SES-CONFIGURATION-SET: a\r\nX-Postmesh-Configuration-Set: b\r\n\r\n",
            "two different",
        ),
    ],
)
def test_bad_option_or_header_lines_are_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        split_options(data)
    assert reason in refused.value.message


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(_OPTION_NAMES) | _field_names, _values), max_size=10),
    st.binary(max_size=200),
    st.sampled_from([b"\r\n", b"\n"]),
)
def test_no_option_header_survives_and_other_fields_keep_their_order(
    fields: list[tuple[str, str]], body: bytes, newline: bytes
) -> None:
    data = newline.join(f"{name}: {value}".encode() for name, value in fields) + newline * 2 + body
    try:
        _, raw = split_options(data)
    except InvalidArgument:
        return  # conflicting or malformed options: refused with a reason
    head, _, rest = raw.partition(newline * 2)
    kept = [line.split(b":", 1)[0].decode() for line in head.split(newline) if line]
    options = {n.lower() for n in _OPTION_NAMES}
    assert kept == [name for name, _ in fields if name.lower() not in options]
    assert rest == body


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_give_options_or_a_clear_refusal(data: bytes) -> None:
    try:
        submission_request("a@example.test", ["b@example.test"], data)
    except InvalidArgument as refused:
        assert refused.message


# --- Replies.


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (
            ResourceExhausted("Maximum sending rate exceeded."),
            "454 Throttling failure: Maximum sending",
        ),
        (
            FailedPrecondition("paused", reason="ACCOUNT_SENDING_PAUSED"),
            "554 Sending paused for this account",
        ),
        (
            FailedPrecondition("Email address is not verified. x@y.test", reason="MESSAGE_REJECTED"),
            "554 Message rejected: Email address is not verified.",
        ),
        (
            FailedPrecondition("MAIL FROM", reason="MAIL_FROM_DOMAIN_NOT_VERIFIED"),
            "554 Message rejected",
        ),
        (
            InvalidArgument(
                "Message length is more than 41943040 bytes long: 41943100.",
                field="content",
                reason="MESSAGE_REJECTED",
            ),
            "552 Message length",
        ),
        (
            InvalidArgument("Illegal filename 'a.exe'", field="content.raw.data", reason="MESSAGE_REJECTED"),
            "554 Message rejected: Illegal filename",
        ),
        (
            InvalidArgument("The raw message has no From header.", field="content.raw.data"),
            "554 Transaction failed: The raw",
        ),
        (NotFound("Configuration set x does not exist."), "554 Transaction failed: Configuration set"),
        (
            Unavailable("The message could not be queued; try again."),
            "451 4.3.0 The message could not be queued",
        ),
        (Unauthenticated("no"), "535 Authentication Credentials Invalid"),
    ],
)
def test_each_domain_error_has_its_smtp_reply(error: PostmeshError, reply: str) -> None:
    assert reply_for(error).startswith(reply)


@given(
    st.text(max_size=600),
    st.sampled_from([InvalidArgument, FailedPrecondition, ResourceExhausted, Unavailable]),
)
def test_a_reply_is_one_short_line_whatever_the_reason_says(message: str, kind: type[PostmeshError]) -> None:
    reply = reply_for(kind(message))
    assert "\r" not in reply and "\n" not in reply and len(reply) < 520
    assert reply[:3].isdigit() and reply[3] == " "


# --- Credentials cache.


def test_credentials_are_kept_until_revoked_and_a_revocation_ends_logged_in_sessions() -> None:
    calls: list[tuple[str, str]] = []
    valid = {("PMUSER", "secret"): "111111111111"}
    now = [0.0]

    async def lookup(username: str, password: str) -> str:
        calls.append((username, password))
        if (username, password) not in valid:
            raise Unauthenticated("Authentication Credentials Invalid")
        return valid[(username, password)]

    credentials = SmtpCredentials(lookup, cache_seconds=60, clock=lambda: now[0])

    async def scenario() -> None:
        login = await credentials.login("PMUSER", "secret")
        assert login.account_id == "111111111111"
        await credentials.login("PMUSER", "secret")
        assert len(calls) == 1  # kept
        with pytest.raises(Unauthenticated):
            await credentials.login("PMUSER", "wrong")
        assert credentials.still_valid(login)
        now[0] = 61.0
        await credentials.login("PMUSER", "secret")
        assert len(calls) == 3  # the kept answer lapsed: asked again
        credentials.forget("PMUSER")
        assert not credentials.still_valid(login)
        del valid[("PMUSER", "secret")]
        with pytest.raises(Unauthenticated):
            await credentials.login("PMUSER", "secret")

    asyncio.run(scenario())


def test_connection_gate_counts_per_client_and_in_total() -> None:
    gate = ConnectionGate(Limits(max_connections=3, max_connections_per_client=2))
    assert gate.enter("10.0.0.1") and gate.enter("10.0.0.1")
    assert not gate.enter("10.0.0.1")
    assert gate.enter("10.0.0.2")
    assert not gate.enter("10.0.0.3")
    gate.leave("10.0.0.1")
    assert gate.enter("10.0.0.3") and gate.open == 3


# --- `postmesh dev`.


def test_dev_listens_on_high_ports_with_a_self_signed_certificate_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_all_service_settings()
    monkeypatch.delenv("SMTP_STARTTLS_LISTEN", raising=False)
    monkeypatch.delenv("SMTP_TLS_LISTEN", raising=False)
    overrides = _dev_smtp(load_settings({}), tmp_path)
    assert overrides["SMTP_STARTTLS_LISTEN"] == "127.0.0.1:2587"
    assert overrides["SMTP_TLS_LISTEN"] == "127.0.0.1:2465"
    cert, key = Path(str(overrides["SMTP_TLS_CERT_FILE"])), Path(str(overrides["SMTP_TLS_KEY_FILE"]))
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    assert key.stat().st_mode & 0o077 == 0
    made = cert.read_bytes()
    _dev_smtp(load_settings({}), tmp_path)
    assert cert.read_bytes() == made
    configured = _dev_smtp(load_settings({"SMTP_TLS_CERT_FILE": "/c", "SMTP_TLS_KEY_FILE": "/k"}), tmp_path)
    assert "SMTP_TLS_CERT_FILE" not in configured
