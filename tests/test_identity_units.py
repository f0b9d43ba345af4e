"""The identity service's domain code on its own: envelope encryption, key import, policies, the
checker's status transitions and backoff, and the CLI's zone-file output."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dns import rdatatype as dns_rdatatype
from dns import zone as dns_zone

from postmesh.cli.identities import zone_snippet
from postmesh.common.errors import FailedPrecondition, InvalidArgument
from postmesh.identity.v1 import identity_pb2 as pb
from services.identity import dkimkeys, policies
from services.identity.dkimkeys import MasterKeyError, MasterKeys, Sealed
from services.identity.dnslookup import DNS_SERVER_ERROR, HOST_NOT_FOUND, Lookup
from services.identity.verification import CheckSchedule, _next_status, dkim_tags


def test_master_keys_parse_and_refuse_bad_values() -> None:
    keys = MasterKeys.parse(f"{MasterKeys.generate('b')}, {MasterKeys.generate('a')}")
    assert keys.current_id == "b" and keys.knows("a") and not keys.knows("c")
    for bad in ("", "  ", "nokey", "k:c2hvcnQ", ":" + "A" * 43):
        with pytest.raises(MasterKeyError):
            MasterKeys.parse(bad)


def test_envelope_encryption_binds_each_ciphertext_to_its_key() -> None:
    keys = MasterKeys.parse(MasterKeys.generate("m1"))
    sealed = keys.seal("key-a", "secret pem")
    assert b"secret pem" not in sealed.encrypted_private_key + sealed.wrapped_data_key
    assert keys.open("key-a", sealed) == "secret pem"
    # Another row's id (the AAD) does not open it: blobs cannot be swapped between keys.
    with pytest.raises(FailedPrecondition):
        keys.open("key-b", sealed)
    with pytest.raises(FailedPrecondition) as excinfo:
        MasterKeys.parse(MasterKeys.generate("m2")).open("key-a", sealed)
    assert excinfo.value.reason == "MASTER_KEY_UNAVAILABLE"
    same_id_other_key = MasterKeys.parse(MasterKeys.generate("m1"))
    with pytest.raises(FailedPrecondition) as excinfo:
        same_id_other_key.rewrap("key-a", sealed.wrapped_data_key, "m1")
    assert excinfo.value.reason == "MASTER_KEY_MISMATCH"


def test_rewrap_keeps_the_data_key() -> None:
    old = MasterKeys.generate("old")
    new = MasterKeys.generate("new")
    before = MasterKeys.parse(old).seal("k", "pem")
    both = MasterKeys.parse(f"{new},{old}")
    wrapped = both.rewrap("k", before.wrapped_data_key, "old")
    after = Sealed(before.encrypted_private_key, wrapped, "new")
    assert MasterKeys.parse(new).open("k", after) == "pem"


def test_private_key_import_accepts_rsa_and_ed25519_in_their_usual_forms() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    none = serialization.NoEncryption()
    forms = [
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, none
        ),
        rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, none),
        base64.b64encode(
            rsa_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, none)
        ),
    ]
    for form in forms:
        material = dkimkeys.import_private_key(form.decode())
        assert (material.algorithm, material.key_bits) == (dkimkeys.RSA, 1024)
    ed = ed25519.Ed25519PrivateKey.generate()
    seed = ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, none)
    material = dkimkeys.import_private_key(base64.b64encode(seed).decode())
    public = ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert (material.algorithm, material.public_key) == (dkimkeys.ED25519, base64.b64encode(public).decode())
    encrypted = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    for bad in (encrypted.decode(), "", "AAAA"):
        with pytest.raises(InvalidArgument):
            dkimkeys.import_private_key(bad)


def test_policies_allow_named_accounts_and_deny_wins() -> None:
    allow = '{"Statement": [{"Effect": "Allow", "Principal": {"AWS": ["111111111111", "arn:aws:iam::222222222222:root"]}, "Action": "ses:SendRawEmail"}]}'  # noqa: E501
    deny = '{"Statement": {"Effect": "Deny", "Principal": {"AWS": "222222222222"}, "Action": ["ses:*"]}}'
    assert policies.authorizes([allow], "111111111111")
    assert policies.authorizes([allow], "222222222222")
    assert not policies.authorizes([allow], "333333333333")
    assert not policies.authorizes([allow, deny], "222222222222")
    assert policies.authorizes([allow, deny], "111111111111")
    with pytest.raises(InvalidArgument):
        policies.parse_policy("x" * (policies.MAX_POLICY_BYTES + 1))


@pytest.mark.parametrize(
    "current,found,error,expired,expected",
    [
        ("PENDING", True, "", False, "SUCCESS"),
        ("PENDING", False, HOST_NOT_FOUND, False, "PENDING"),
        ("PENDING", False, HOST_NOT_FOUND, True, "FAILED"),
        ("PENDING", False, DNS_SERVER_ERROR, False, "TEMPORARY_FAILURE"),
        ("SUCCESS", False, HOST_NOT_FOUND, True, "FAILED"),
        ("SUCCESS", False, DNS_SERVER_ERROR, True, "SUCCESS"),
        ("FAILED", True, "", True, "SUCCESS"),
        ("FAILED", False, DNS_SERVER_ERROR, True, "FAILED"),
    ],
)
def test_status_transitions(current: str, found: bool, error: str, expired: bool, expected: str) -> None:
    assert _next_status(current, found, Lookup(error=error), expired) == expected


def test_backoff_doubles_up_to_the_cap() -> None:
    schedule = CheckSchedule(initial_seconds=60, max_seconds=600)
    assert [schedule.retry_delay(n) for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]


def test_dkim_tags_ignore_spacing() -> None:
    assert dkim_tags("v=DKIM1; k=rsa;\tp=AB CD\n EF")["p"] == "ABCDEF"


def test_zone_snippet_is_a_valid_zone_with_long_txt_split() -> None:
    long_value = dkimkeys.dns_value(dkimkeys.RSA, "A" * 400)
    records = [
        pb.DnsRecord(name="_postmesh.example.test", type="TXT", value='postmesh-verification="x"'),
        pb.DnsRecord(name="s1._domainkey.example.test", type="TXT", value=long_value),
        pb.DnsRecord(name="bounce.example.test", type="MX", value="10 feedback-smtp.postmesh.test"),
    ]
    zone = dns_zone.from_text(
        zone_snippet(records), origin="example.test.", relativize=False, check_origin=False
    )
    txt = zone.find_rdataset("s1._domainkey.example.test.", dns_rdatatype.TXT)
    strings = next(iter(txt)).strings
    assert len(strings) == 2 and b"".join(strings).decode() == long_value
    quoted = zone.find_rdataset("_postmesh.example.test.", dns_rdatatype.TXT)
    assert b"".join(next(iter(quoted)).strings) == b'postmesh-verification="x"'
    mx = next(iter(zone.find_rdataset("bounce.example.test.", dns_rdatatype.MX)))
    assert (mx.preference, mx.exchange.to_text()) == (10, "feedback-smtp.postmesh.test.")


def test_verification_message_keeps_the_link_whole_for_text_viewers() -> None:
    """The quick start opens the sink's .eml in any viewer and clicks the link: no quoted-printable."""
    import datetime as dt

    from services.identity.mailer import VerificationMailer, confirmation_link

    class Clock:
        def now(self) -> dt.datetime:
            return dt.datetime(2026, 12, 1, tzinfo=dt.UTC)

    mailer = VerificationMailer(
        None,  # type: ignore[arg-type]  # building a message needs no JetStream
        Clock(),
        system_account_id="system",
        system_address="no-reply@postmesh.test",
        link_base=lambda: "http://127.0.0.1:8090",
    )
    token = "x" * 60
    raw = mailer.build("you@example.com", token, Clock().now()).as_bytes()
    assert confirmation_link("http://127.0.0.1:8090", token).encode() in raw
    assert b"Content-Transfer-Encoding: 7bit" in raw
