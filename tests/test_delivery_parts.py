"""Delivery parts against real peers on loopback: retry policy, VERP, DKIM signatures checked by
dkimpy's verifier reading keys from a DNS server, MX resolution, SMTP transactions and TLS."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import dkim
import dkim.crypto
import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID

from postmesh.common.config import load_settings
from postmesh.common.natsserver import free_port
from postmesh.common.server import load_all_service_settings
from postmesh.common.verp import VerpKey, bounce_address, parse_bounce_address
from postmesh.testing_mail import Behaviour, LoopbackDns, SmtpServer
from services.sender.backoff import RetryPolicy
from services.sender.delivery import _Heartbeat
from services.sender.delivery_wiring import build_transport
from services.sender.dkim_signing import (
    ED25519_SHA256,
    RSA_SHA256,
    SigningConfig,
    SigningConfigCache,
    SigningKey,
    rsassa_pkcs1_v1_5_sign,
    sign_message,
)
from services.sender.mx import MxResolver, RouteError
from services.sender.transport import Envelope, Kind, SinkTransport, SmtpOptions, SmtpPool, SmtpTransport
from tests.dkim_verifiers import dkimpy_dns

MESSAGE = (
    b"From: Sender <news@example.test>\r\nTo: rcpt@ok.test\r\nSubject: Hello\r\n"
    b"Message-ID: <m1@example.test>\r\nDate: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello there.\r\n"
)


def test_backoff_grows_is_capped_and_stops_at_the_time_to_live() -> None:
    policy = RetryPolicy(base_minutes=5, max_minutes=60, max_age=dt.timedelta(hours=4))
    delays = [policy.delay_after(n).total_seconds() / 60 for n in range(6)]
    assert delays == [5, 10, 20, 40, 60, 60]
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert policy.next_attempt(0, now, now + dt.timedelta(hours=1)) == now + dt.timedelta(minutes=5)
    assert policy.next_attempt(3, now, now + dt.timedelta(minutes=30)) is None
    assert policy.delay_after(10_000) == dt.timedelta(minutes=60)


@pytest.mark.parametrize(
    "recipient",
    ["user@ok.test", "first.last+tag-x=y@sub.ok.test", '"odd -=+ local"@ok.test', "jürgen@bücher.test"],
)
def test_verp_round_trips_any_recipient_and_survives_case_changes(recipient: str) -> None:
    key = VerpKey(b"shared by every replica")
    address = bounce_address("0100-abc-42", recipient, "bounce.example.test", key)
    local = address.rpartition("@")[0]
    assert local.isascii() and " " not in local and '"' not in local
    for form in (address, address.upper(), f"<{address}>"):
        parsed = parse_bounce_address(form, key)
        assert parsed is not None and parsed.recipient == recipient
        assert parsed.message_id.lower() == "0100-abc-42"
    several = parse_bounce_address(bounce_address("0100-abc-42", None, "b.test", key), key)
    assert several is not None and several.message_id == "0100-abc-42" and several.recipient is None
    assert parse_bounce_address("someone@else.test", key) is None
    assert parse_bounce_address("bounce+x-!!!@b.test", key) is None


def test_verp_addresses_forged_tampered_or_under_another_key_map_to_nothing() -> None:
    key = VerpKey(b"ours")
    address = bounce_address("0100-abc-42", "user@ok.test", "b.test", key)
    assert parse_bounce_address(address, VerpKey(b"theirs")) is None
    local, _, domain = address.partition("@")
    head, _, tag = local.rpartition("-")
    # Another message id or recipient under the same tag, a changed tag, no tag (the old form).
    assert parse_bounce_address(address.replace("0100-abc-42", "0100-abc-43"), key) is None
    other = bounce_address("0100-abc-42", "victim@ok.test", "b.test", key).partition("@")[0]
    assert parse_bounce_address(f"{other.rpartition('-')[0]}-{tag}@{domain}", key) is None
    assert parse_bounce_address(f"{head}-{'a' * len(tag)}@{domain}", key) is None
    assert parse_bounce_address(f"{head}@{domain}", key) is None


def _rsa_pem() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, base64.b64encode(public).decode()


def _ed25519_pem() -> tuple[str, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return pem, base64.b64encode(key.public_key().public_bytes_raw()).decode()


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


def test_rsa_and_ed25519_signatures_verify_against_keys_published_in_dns(zone: LoopbackDns) -> None:
    rsa_pem, rsa_public = _rsa_pem()
    ed_pem, ed_public = _ed25519_pem()
    zone.add_txt("rsa1._domainkey.example.test", f"v=DKIM1; k=rsa; p={rsa_public}")
    zone.add_txt("ed1._domainkey.example.test", f"v=DKIM1; k=ed25519; p={ed_public}")
    config = SigningConfig(
        "example.test",
        (SigningKey("rsa1", RSA_SHA256, rsa_pem), SigningKey("ed1", ED25519_SHA256, ed_pem)),
    )
    signed = sign_message(MESSAGE, config)
    assert signed.count(b"DKIM-Signature:") == 2 and signed.endswith(MESSAGE)
    lookup = dkimpy_dns(zone)
    verifier = dkim.DKIM(signed)
    assert verifier.verify(0, dnsfunc=lookup) and verifier.verify(1, dnsfunc=lookup)
    # dkimpy signs through cryptography, and the signature is the one its pure-Python RSA gives
    # (PKCS#1 v1.5 is deterministic), both for our cached key and for a key dict dkimpy parsed.
    assert dkim.RSASSA_PKCS1_v1_5_sign is rsassa_pkcs1_v1_5_sign
    pure_key = dkim.crypto.parse_pem_private_key(rsa_pem.encode())
    expected = dkim.crypto.RSASSA_PKCS1_v1_5_sign(hashlib.sha256(b"body"), pure_key)
    assert rsassa_pkcs1_v1_5_sign(hashlib.sha256(b"body"), pure_key) == expected
    cached_key = dkim.parse_pem_private_key(rsa_pem.encode())
    assert rsassa_pkcs1_v1_5_sign(hashlib.sha256(b"body"), cached_key) == expected
    tampered = signed.replace(b"Hello there.", b"Hello thar.")
    for index in (0, 1):
        with pytest.raises(dkim.ValidationError):
            dkim.DKIM(tampered).verify(index, dnsfunc=lookup)
    assert sign_message(MESSAGE, SigningConfig("example.test")) == MESSAGE


async def test_signing_configs_are_cached_and_forgotten_on_identity_change() -> None:
    calls: list[tuple[str, str]] = []

    async def fetch(account_id: str, domain: str) -> SigningConfig:
        calls.append((account_id, domain))
        return SigningConfig(domain)

    cache = SigningConfigCache(fetch)
    await cache.get("acct", "Example.test")
    await cache.get("acct", "example.test")
    assert calls == [("acct", "example.test")]
    cache.forget("someone@other.test")
    await cache.get("acct", "example.test")
    assert len(calls) == 1
    cache.forget("news@example.test")
    await cache.get("acct", "example.test")
    assert len(calls) == 2


async def test_mx_resolution_orders_by_preference_falls_back_to_a_and_refuses_null_mx(
    zone: LoopbackDns,
) -> None:
    zone.add_mx("multi.test", "backup.multi.test", 20)
    zone.add_mx("multi.test", "primary.multi.test", 5)
    zone.add_a("primary.multi.test", "127.0.0.2")
    zone.add_a("backup.multi.test", "127.0.0.3", "127.0.0.4")
    zone.add_a("bare.test", "127.0.0.5")
    zone.add_mx("null.test", ".", 0)
    zone.add_mx("dangling.test", "nowhere.dangling.test", 10)
    resolver = MxResolver(["127.0.0.1"], port=zone.port, timeout=5)
    hosts = await resolver.resolve("multi.test")
    assert [(h.name, h.preference, h.addresses) for h in hosts] == [
        ("primary.multi.test", 5, ("127.0.0.2",)),
        ("backup.multi.test", 20, ("127.0.0.3", "127.0.0.4")),
    ]
    assert [(h.name, h.addresses) for h in await resolver.resolve("bare.test")] == [
        ("bare.test", ("127.0.0.5",))
    ]
    for domain, status in [("null.test", "5.1.10"), ("missing.test", "5.1.2"), ("dangling.test", "5.4.4")]:
        with pytest.raises(RouteError) as excinfo:
            await resolver.resolve(domain)
        assert excinfo.value.permanent and excinfo.value.status == status
    silent = MxResolver(["127.0.0.1"], port=free_port(), timeout=0.5)  # nothing answers there
    with pytest.raises(RouteError) as excinfo:
        await silent.resolve("multi.test")
    assert not excinfo.value.permanent


def _tls_context(tmp_path: Path) -> ssl.SSLContext:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


def _options(**overrides: object) -> SmtpOptions:
    values: dict[str, object] = {"helo_name": "postmesh.test", "timeout": 20.0}
    values.update(overrides)
    return SmtpOptions(**values)  # type: ignore[arg-type]


_VERP_KEY = VerpKey(b"test")


def _envelope(*recipients: str, require_tls: bool = False, message_id: str = "m1") -> Envelope:
    return Envelope(
        message_id=message_id,
        mail_from=bounce_address(
            message_id, recipients[0] if len(recipients) == 1 else None, "b.test", _VERP_KEY
        ),
        recipients=recipients,
        domain=recipients[0].rpartition("@")[2],
        require_tls=require_tls,
    )


async def test_one_transaction_per_domain_with_a_reply_per_recipient_and_reused_connections() -> None:
    behaviour = Behaviour(reject={"gone@ok.test": "550 5.1.1 <gone@ok.test>: user unknown"})
    with SmtpServer(behaviour=behaviour) as server:
        transport = SmtpTransport(SmtpPool(_options()), smarthost=("127.0.0.1", server.port))
        outcomes = await transport.deliver(_envelope("a@ok.test", "gone@ok.test", "b@ok.test"), MESSAGE)
        assert outcomes["a@ok.test"].kind is Kind.DELIVERED and outcomes["b@ok.test"].kind is Kind.DELIVERED
        assert outcomes["a@ok.test"].response == "250 2.0.0 OK queued"
        assert outcomes["a@ok.test"].remote_ip == "127.0.0.1"
        gone = outcomes["gone@ok.test"]
        assert (gone.kind, gone.status) == (Kind.PERMANENT, "5.1.1") and "user unknown" in gone.response
        for n in range(3):
            again = await transport.deliver(_envelope("c@ok.test", message_id=f"m{n + 2}"), MESSAGE)
            assert again["c@ok.test"].kind is Kind.DELIVERED
        received = server.received
        assert [r.recipients for r in received] == [["a@ok.test", "b@ok.test"], *[["c@ok.test"]] * 3]
        assert parse_bounce_address(received[0].mail_from, _VERP_KEY).recipient is None  # type: ignore[union-attr]
        assert parse_bounce_address(received[1].mail_from, _VERP_KEY).recipient == "c@ok.test"  # type: ignore[union-attr]
        assert len({r.peer for r in received}) == 1
        pool = transport.pool
        assert sum(len(v) for v in pool._idle.values()) == 1  # one connection carried all four messages
        await transport.close()


async def test_temporary_refusals_and_refused_connections_are_transient() -> None:
    with SmtpServer(behaviour=Behaviour(defer_first=1)) as server:
        transport = SmtpTransport(SmtpPool(_options()), smarthost=("127.0.0.1", server.port))
        first = await transport.deliver(_envelope("a@ok.test"), MESSAGE)
        assert first["a@ok.test"].kind is Kind.TRANSIENT and first["a@ok.test"].status == "4.3.0"
        assert first["a@ok.test"].delay_type == "RecipientServerError"
        second = await transport.deliver(_envelope("a@ok.test"), MESSAGE)
        assert second["a@ok.test"].kind is Kind.DELIVERED
        await transport.close()
    nobody = SmtpTransport(SmtpPool(_options()), smarthost=("127.0.0.1", free_port()))
    refused = await nobody.deliver(_envelope("a@ok.test"), MESSAGE)
    assert refused["a@ok.test"].kind is Kind.TRANSIENT
    assert refused["a@ok.test"].delay_type == "TransientCommunicationFailure"


async def test_smarthost_with_required_starttls_and_auth(tmp_path: Path) -> None:
    def authenticate(
        server: object, session: object, envelope: object, mechanism: str, auth: object
    ) -> AuthResult:
        ok = isinstance(auth, LoginPassword) and (auth.login, auth.password) == (b"relay-user", b"s3cret")
        return AuthResult(success=ok)

    tls = _tls_context(tmp_path)
    strict = SmtpServer(
        tls_context=tls,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=authenticate,
    )
    with strict:
        good = _options(tls_mode="starttls", username="relay-user", password="s3cret")
        transport = SmtpTransport(SmtpPool(good), smarthost=("127.0.0.1", strict.port))
        outcomes = await transport.deliver(_envelope("a@ok.test", require_tls=True), MESSAGE)
        assert outcomes["a@ok.test"].kind is Kind.DELIVERED
        assert strict.received[0].tls
        await transport.close()
        wrong = _options(tls_mode="starttls", username="relay-user", password="nope", timeout=3.0)
        refused = await SmtpTransport(SmtpPool(wrong), smarthost=("127.0.0.1", strict.port)).deliver(
            _envelope("a@ok.test"), MESSAGE
        )
        assert refused["a@ok.test"].kind is Kind.TRANSIENT
    with SmtpServer() as plain:  # offers no STARTTLS
        opportunistic = SmtpTransport(SmtpPool(_options()), smarthost=("127.0.0.1", plain.port))
        assert (await opportunistic.deliver(_envelope("a@ok.test"), MESSAGE))[
            "a@ok.test"
        ].kind is Kind.DELIVERED
        required = await opportunistic.deliver(_envelope("b@ok.test", require_tls=True), MESSAGE)
        assert required["b@ok.test"].kind is Kind.TRANSIENT and "STARTTLS" in required["b@ok.test"].response
        assert [r.recipients for r in plain.received] == [["a@ok.test"]]
        await opportunistic.close()


def test_delivery_mode_settings_are_checked_at_start(tmp_path: Path) -> None:
    load_all_service_settings()
    base = load_settings({}, data_dir=str(tmp_path))
    assert isinstance(build_transport(base), SinkTransport)  # the default: nothing leaves the machine
    mx = build_transport(base.with_overrides(delivery_mode="mx", dns_resolver="127.0.0.1:5353"))
    assert isinstance(mx, SmtpTransport) and mx.resolver is not None and mx.port == 25
    relay = build_transport(base.with_overrides(delivery_mode="smarthost", smarthost="relay.test:2525"))
    assert isinstance(relay, SmtpTransport) and relay.smarthost == ("relay.test", 2525)
    for bad, message in [
        ({"delivery_mode": "pigeon"}, "DELIVERY_MODE"),
        ({"delivery_mode": "smarthost"}, "SMARTHOST"),
        ({"delivery_mode": "smarthost", "smarthost": "r.test:25", "smarthost_tls": "maybe"}, "SMARTHOST_TLS"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_transport(base.with_overrides(**bad))


class _ProgressReports:
    """A JetStream message's in_progress, counted; failing from the `fail_at`th report on."""

    def __init__(self, fail_at: int = 0) -> None:
        self.reports = 0
        self.fail_at = fail_at

    async def in_progress(self) -> None:
        self.reports += 1
        if self.fail_at and self.reports >= self.fail_at:
            raise ConnectionError("NATS went away")


async def test_a_delivery_reports_progress_until_stopped_and_not_after_a_failed_report() -> None:
    msg = _ProgressReports()
    heartbeat = _Heartbeat(msg, 0.02)  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert msg.reports >= 3
    heartbeat.stop()
    stopped_at = msg.reports
    await asyncio.sleep(0.1)
    assert msg.reports == stopped_at

    failing = _ProgressReports(fail_at=2)
    heartbeat = _Heartbeat(failing, 0.02)  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert failing.reports == 2
    heartbeat.stop()
