"""Easy DKIM and BYODKIM: keys that independent verifiers accept (dkimpy, Perl's Mail::DKIM) reading
the public keys from a DNS server on loopback, rotation, key import, encryption at rest with master
key rotation, and the background checker flipping a domain both ways."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import dkim
import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dns import rdatatype as dns_rdatatype
from dns import zone as dns_zone

from postmesh.cli.main import main
from postmesh.cli.server import _dev_secrets
from postmesh.client import Client
from postmesh.common.errors import FailedPrecondition
from postmesh.events.v1 import events_pb2
from postmesh.identity.v1 import identity_pb2 as pb
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns
from services.identity.dkimkeys import MasterKeys, Sealed
from tests.conftest import MeshFactory
from tests.dkim_verifiers import dkimpy_dns, perl_dkim_available, perl_dkim_result
from tests.identity_helpers import (
    authorize,
    create_verified_domain,
    identity_events,
    internal,
    publish,
    rpc_error,
)

Change = events_pb2.IdentityChangeType


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    server = LoopbackDns().start()
    yield server
    server.stop()


@pytest.fixture
def idmesh(start_mesh: MeshFactory, dns: LoopbackDns) -> MeshThread:
    return start_mesh(dns_resolver=dns.address, dns_check_poll_seconds=3600, dns_timeout_seconds=2)


def _sample_message(domain: str) -> bytes:
    message = EmailMessage()
    message["From"] = f"News <news@{domain}>"
    message["To"] = "reader@elsewhere.test"
    message["Subject"] = "DKIM test"
    message["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    message["Message-ID"] = make_msgid(domain=domain)
    message.set_content("Signed by a key postmesh keeps, verified by a key read from DNS.\n")
    return message.as_bytes().replace(b"\n", b"\r\n")


def _sign(message: bytes, domain: str, key: pb.DkimSigningKey) -> bytes:
    """Prepends a DKIM-Signature made with dkimpy from the key GetSigningConfig returned."""
    if key.algorithm == "ed25519-sha256":
        private = serialization.load_pem_private_key(key.private_key_pem.encode(), password=None)
        assert isinstance(private, ed25519.Ed25519PrivateKey)
        seed = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        signature = dkim.sign(
            message,
            key.selector.encode(),
            domain.encode(),
            base64.b64encode(seed),
            signature_algorithm=b"ed25519-sha256",
        )
    else:
        signature = dkim.sign(message, key.selector.encode(), domain.encode(), key.private_key_pem.encode())
    return signature + message


def _verify_all(message: bytes, server: LoopbackDns) -> list[bool]:
    verifier = dkim.DKIM(message)
    count = sum(1 for line in message.split(b"\r\n") if line.lower().startswith(b"dkim-signature:"))
    results = []
    for i in range(count):
        try:
            results.append(bool(verifier.verify(idx=i, dnsfunc=dkimpy_dns(server))))
        except dkim.DKIMException:  # a broken body or header hash is raised, not returned
            results.append(False)
    return results


def test_signing_keys_verify_independently_from_dns(
    idmesh: MeshThread, dns: LoopbackDns, capsys: pytest.CaptureFixture[str]
) -> None:
    account_id, key = idmesh.create_account()
    # Created with the CLI; the zone-file snippet it prints is what gets published, parsed as a zone.
    capsys.readouterr()
    assert (
        main(
            ["identity", "create", "signed.test", "--ed25519", "--endpoint", idmesh.address, "--api-key", key]
        )
        == 0
    )
    snippet = capsys.readouterr().out.split("; DNS records to publish", 1)[1].split("\n", 1)[1]
    zone = dns_zone.from_text(snippet, origin="signed.test.", relativize=False, check_origin=False)
    for name, node in zone.nodes.items():
        for rdataset in node.rdatasets:
            assert rdataset.rdtype == dns_rdatatype.TXT
            for rdata in rdataset:
                dns.publish(name.to_text(omit_final_dot=True), "TXT", b"".join(rdata.strings).decode())
    with idmesh.client(key) as client, internal(idmesh) as service:
        checked = client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="signed.test")
        ).identity
        assert checked.verified_for_sending_status
        assert checked.dkim_attributes.status == pb.VERIFICATION_STATUS_SUCCESS
        config = service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="signed.test")
        )
    assert sorted(k.algorithm for k in config.keys) == ["ed25519-sha256", "rsa-sha256"]
    assert main(["identity", "list", "--endpoint", idmesh.address, "--api-key", key]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["signed.test", "DOMAIN", "SUCCESS", "yes"]
    assert main(["identity", "get", "signed.test", "--endpoint", idmesh.address, "--api-key", key]) == 0
    shown = capsys.readouterr().out
    assert "verification:  SUCCESS  (verified for sending)" in shown and "(all found)" in shown

    # Both keys sign one message: both signatures verify with the keys read from DNS.
    message = _sample_message("signed.test")
    signed = message
    for signing_key in config.keys:
        signed = _sign(signed, config.domain, signing_key)
    assert _verify_all(signed, dns) == [True, True]
    tampered = signed.replace(b"verified by a key", b"verified by a kez")
    assert _verify_all(tampered, dns) == [False, False]

    rsa_key = next(k for k in config.keys if k.algorithm == "rsa-sha256")
    rsa_signed = _sign(message, config.domain, rsa_key)
    if not perl_dkim_available():
        pytest.skip("Perl Mail::DKIM is not installed (apt-get install libmail-dkim-perl)")
    assert perl_dkim_result(rsa_signed, dns.port) == "pass"
    assert perl_dkim_result(rsa_signed.replace(b"verified by", b"verifyed by"), dns.port) == "fail"


def test_rotation_switches_signing_only_once_the_new_records_are_published(
    idmesh: MeshThread, dns: LoopbackDns
) -> None:
    account_id, key = idmesh.create_account()
    with idmesh.client(key) as client, internal(idmesh) as service:
        before = create_verified_domain(
            client, dns, "rotate.test", pb.DkimSigningAttributes(include_ed25519=True)
        )
        old = set(before.dkim_attributes.tokens)

        def signing_selectors() -> set[str]:
            config = service.identity.GetSigningConfig(
                pb.GetSigningConfigRequest(account_id=account_id, domain="rotate.test")
            )
            return {k.selector for k in config.keys}

        rotated = client.identity.RotateEmailIdentityDkimKeys(
            pb.RotateEmailIdentityDkimKeysRequest(
                email_identity="rotate.test", next_signing_key_length=pb.DKIM_SIGNING_KEY_LENGTH_RSA_1024_BIT
            )
        )
        new_keys = [k for k in rotated.dkim_attributes.keys if k.state == "NEXT"]
        assert len(new_keys) == 2 and not {k.selector for k in new_keys} & old
        assert {r.name.split(".")[0] for r in rotated.dns_records} == old | {k.selector for k in new_keys}
        code, reason, _, _ = rpc_error(
            lambda: client.identity.RotateEmailIdentityDkimKeys(
                pb.RotateEmailIdentityDkimKeysRequest(email_identity="rotate.test")
            )
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ROTATION_IN_PROGRESS")

        # Half the new records published: the old keys keep signing.
        new_records = [r for r in rotated.dns_records if r.name.split(".")[0] not in old]
        publish(dns, new_records[:1])
        client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="rotate.test")
        )
        assert signing_selectors() == old
        publish(dns, new_records[1:])
        after = client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="rotate.test")
        ).identity
        assert signing_selectors() == {k.selector for k in new_keys}
        states = {k.selector: k.state for k in after.dkim_attributes.keys}
        assert {states[s] for s in old} == {"RETIRED"}
        assert set(after.dkim_attributes.tokens) == {k.selector for k in new_keys}
        assert after.dkim_attributes.current_signing_key_length == pb.DKIM_SIGNING_KEY_LENGTH_RSA_1024_BIT
        assert (
            after.dkim_attributes.last_key_generation_timestamp.ToDatetime()
            > before.dkim_attributes.last_key_generation_timestamp.ToDatetime()
        )
        config = service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="rotate.test")
        )
        message = _sample_message("rotate.test")
        for signing_key in config.keys:
            message = _sign(message, "rotate.test", signing_key)
        assert _verify_all(message, dns) == [True, True]


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL
        if isinstance(key, rsa.RSAPrivateKey)
        else serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _prime(bits: int) -> int:
    while True:
        candidate = secrets.randbits(bits) | (1 << (bits - 1)) | 1
        if all(pow(witness, candidate - 1, candidate) == 1 for witness in (2, 3, 5, 7, 11, 13, 17, 19, 23)):
            return candidate


def _short_rsa_key() -> rsa.RSAPrivateKey:
    """A 512-bit RSA key (too short for DKIM); `cryptography` refuses to generate one itself."""
    e = 65537
    while True:
        p, q = _prime(256), _prime(256)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e:
            break
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(
        p,
        q,
        d,
        rsa.rsa_crt_dmp1(d, p),
        rsa.rsa_crt_dmq1(d, q),
        rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, p * q),
    )
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


def test_bring_your_own_dkim_key(idmesh: MeshThread, dns: LoopbackDns) -> None:
    account_id, key = idmesh.create_account()
    own = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with idmesh.client(key) as client, internal(idmesh) as service:
        bad_keys = [
            (
                _pem(_short_rsa_key()),
                "domain_signing_private_key",
            ),
            (_pem(ec.generate_private_key(ec.SECP256R1())), "domain_signing_private_key"),
            (
                "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
                "domain_signing_private_key",
            ),
            ("not base64 at all!", "domain_signing_private_key"),
        ]
        for text, field in bad_keys:
            code, _, _, metadata = rpc_error(
                lambda text=text: client.identity.CreateEmailIdentity(
                    pb.CreateEmailIdentityRequest(
                        email_identity="own.test",
                        dkim_signing_attributes=pb.DkimSigningAttributes(
                            domain_signing_selector="mine", domain_signing_private_key=text
                        ),
                    )
                )
            )
            assert (code, metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, field)
        code, _, _, metadata = rpc_error(
            lambda: client.identity.CreateEmailIdentity(
                pb.CreateEmailIdentityRequest(
                    email_identity="own.test",
                    dkim_signing_attributes=pb.DkimSigningAttributes(
                        domain_signing_selector="bad selector!", domain_signing_private_key=_pem(own)
                    ),
                )
            )
        )
        assert (code, metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, "domain_signing_selector")
        # Nothing was half-created by the refusals.
        assert not client.identity.ListEmailIdentities(pb.ListEmailIdentitiesRequest()).email_identities

        # A base64 DER key (as SES takes it) under the caller's selector.
        der = own.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        verified = create_verified_domain(
            client,
            dns,
            "own.test",
            pb.DkimSigningAttributes(
                domain_signing_selector="mine", domain_signing_private_key=base64.b64encode(der).decode()
            ),
        )
        assert (
            verified.dkim_attributes.signing_attributes_origin == pb.DKIM_SIGNING_ATTRIBUTES_ORIGIN_EXTERNAL
        )
        assert list(verified.dkim_attributes.tokens) == ["mine"]
        [config_key] = service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="own.test")
        ).keys
        returned = serialization.load_pem_private_key(config_key.private_key_pem.encode(), password=None)
        assert isinstance(returned, rsa.RSAPrivateKey)
        assert returned.private_numbers() == own.private_numbers()
        code, reason, _, _ = rpc_error(
            lambda: client.identity.RotateEmailIdentityDkimKeys(
                pb.RotateEmailIdentityDkimKeysRequest(email_identity="own.test")
            )
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BYODKIM_IN_USE")

        # Switching to an ed25519 key of one's own (a bare base64 seed): the current key keeps signing
        # until the new one's record is published, as in a rotation.
        seed = ed25519.Ed25519PrivateKey.generate()
        raw = seed.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        switched = client.identity.PutEmailIdentityDkimSigningAttributes(
            pb.PutEmailIdentityDkimSigningAttributesRequest(
                email_identity="own.test",
                signing_attributes_origin=pb.DKIM_SIGNING_ATTRIBUTES_ORIGIN_EXTERNAL,
                signing_attributes=pb.DkimSigningAttributes(
                    domain_signing_selector="ed", domain_signing_private_key=base64.b64encode(raw).decode()
                ),
            )
        )
        assert switched.dkim_status == pb.VERIFICATION_STATUS_SUCCESS
        assert set(switched.dkim_tokens) == {"mine", "ed"}
        assert _key_states(client, "own.test") == {("mine", "ACTIVE"), ("ed", "NEXT")}
        [still] = service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="own.test")
        ).keys
        assert still.selector == "mine"
        publish(dns, switched.dns_records)
        client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="own.test")
        )
        [ed_key] = service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="own.test")
        ).keys
        assert (ed_key.selector, ed_key.algorithm) == ("ed", "ed25519-sha256")
        assert _verify_all(_sign(_sample_message("own.test"), "own.test", ed_key), dns) == [True]

        # Back to Easy DKIM: new keys of postmesh's own.
        easy = client.identity.PutEmailIdentityDkimSigningAttributes(
            pb.PutEmailIdentityDkimSigningAttributesRequest(
                email_identity="own.test",
                signing_attributes_origin=pb.DKIM_SIGNING_ATTRIBUTES_ORIGIN_POSTMESH,
            )
        )
        assert easy.dkim_status == pb.VERIFICATION_STATUS_SUCCESS
        states = _key_states(client, "own.test")
        waiting = [selector for selector, state in states if state == "NEXT"]
        assert waiting and all(t.startswith("pm") for t in waiting)
        assert [selector for selector, state in states if state == "ACTIVE"] == ["ed"]
        assert [
            k.selector
            for k in service.identity.GetSigningConfig(
                pb.GetSigningConfigRequest(account_id=account_id, domain="own.test")
            ).keys
        ] == ["ed"]


def _key_states(client: Client, domain: str) -> set[tuple[str, str]]:
    identity = client.identity.GetEmailIdentity(pb.GetEmailIdentityRequest(email_identity=domain))
    return {(k.selector, k.state) for k in identity.dkim_attributes.keys}


def _raw_keys(data_dir: Path) -> list[tuple[str, str, bytes, bytes, str]]:
    with sqlite3.connect(data_dir / "identity.db") as db:
        return db.execute(
            "SELECT key_id, public_key, encrypted_private_key, wrapped_data_key, master_key_id FROM dkim_keys"
        ).fetchall()


def test_keys_at_rest_need_the_master_key_which_can_be_rotated(
    start_mesh: MeshFactory, dns: LoopbackDns, tmp_path: Path
) -> None:
    old_key, new_key = MasterKeys.generate("old"), MasterKeys.generate("new")
    data_dir = tmp_path / "keys"
    settings = {"dns_resolver": dns.address, "dns_check_poll_seconds": 3600, "data_dir": data_dir}
    mesh = start_mesh(dkim_master_keys=old_key, **settings)
    account_id, key = mesh.create_account()
    with mesh.client(key) as client, internal(mesh) as service:
        create_verified_domain(client, dns, "vault.test")
        [signing] = service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="vault.test")
        ).keys
    mesh.stop()

    # The raw table: no private key in any form, only ciphertext that needs the master key.
    private = serialization.load_pem_private_key(signing.private_key_pem.encode(), password=None)
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    rows = _raw_keys(data_dir)
    assert rows and {r[4] for r in rows} == {"old"}
    db_bytes = (data_dir / "identity.db").read_bytes()
    for needle in (signing.private_key_pem.encode(), der, base64.b64encode(der), b"PRIVATE KEY"):
        assert needle not in db_bytes
        assert not any(needle in r[2] or needle in r[3] for r in rows)
    row = rows[0]
    sealed = Sealed(row[2], row[3], row[4])
    with pytest.raises(FailedPrecondition) as excinfo:
        MasterKeys.parse(MasterKeys.generate("old")).open(row[0], sealed)  # right id, wrong key
    assert excinfo.value.reason == "MASTER_KEY_MISMATCH"
    opened = {MasterKeys.parse(old_key).open(r[0], Sealed(r[2], r[3], r[4])) for r in rows}
    assert signing.private_key_pem in opened

    # A new master key in front: old keys still decrypt; rewrap moves every data key to it.
    mesh = start_mesh(dkim_master_keys=f"{new_key},{old_key}", **settings)
    with mesh.admin() as admin, mesh.client(key) as client:
        reply = admin.identity.RewrapDkimKeys(pb.RewrapDkimKeysRequest())
        assert (reply.master_key_id, reply.rewrapped, reply.already_current) == ("new", len(rows), 0)
        assert rpc_error(lambda: client.identity.RewrapDkimKeys(pb.RewrapDkimKeysRequest()))[0] == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    mesh.stop()
    assert {(r[0], r[2]) for r in _raw_keys(data_dir)} == {(r[0], r[2]) for r in rows}  # same ciphertext
    assert {r[4] for r in _raw_keys(data_dir)} == {"new"}

    # The old master key may go: the identity and its keys are intact.
    mesh = start_mesh(dkim_master_keys=new_key, **settings)
    with internal(mesh) as service:
        [again] = service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="vault.test")
        ).keys
        assert again.private_key_pem == signing.private_key_pem
    mesh.stop()
    # Without it they cannot be read, and the signing config says so.
    mesh = start_mesh(dkim_master_keys=old_key, **settings)
    with internal(mesh) as service:
        code, reason, _, _ = rpc_error(
            lambda: service.identity.GetSigningConfig(
                pb.GetSigningConfigRequest(account_id=account_id, domain="vault.test")
            )
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MASTER_KEY_UNAVAILABLE")


def test_serve_refuses_to_start_identity_without_a_master_key(tmp_path: Path, nats_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DKIM_MASTER_KEYS"}
    env |= {
        "GRPC_LISTEN": "127.0.0.1:0",
        "METRICS_PORT": "0",
        "DATA_DIR": str(tmp_path),
        "NATS_URL": nats_url,
        "SERVICE_API_KEY": "s",
    }
    for value, message in (
        ("", "DKIM_MASTER_KEYS is not set"),
        ("k1:tooshort", "is not 'id:base64(32 bytes)'"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "postmesh.cli.main", "serve", "identity"],
            env=env | {"DKIM_MASTER_KEYS": value},
            capture_output=True,
            timeout=120,
        )
        assert result.returncode == 2
        assert message in result.stderr.decode() and "Traceback" not in result.stderr.decode()
    # `postmesh dev` makes one in DATA_DIR and keeps it.
    first = _dev_secrets(tmp_path)
    assert MasterKeys.parse(first["DKIM_MASTER_KEYS"]).current_id == "dev"
    assert _dev_secrets(tmp_path)["DKIM_MASTER_KEYS"] == first["DKIM_MASTER_KEYS"]
    assert (tmp_path / "dev-secrets.env").stat().st_mode & 0o077 == 0


def _wait_status(
    client: Client, name: str, status: pb.VerificationStatus.ValueType, wait: float = 60.0
) -> pb.GetEmailIdentityResponse:
    deadline = time.monotonic() + wait
    while True:
        got = client.identity.GetEmailIdentity(pb.GetEmailIdentityRequest(email_identity=name))
        if got.verification_status == status:
            return got
        assert time.monotonic() < deadline, f"{name} stayed {got.verification_status}"
        time.sleep(0.1)


def test_background_checker_verifies_fails_and_reverifies(
    start_mesh: MeshFactory, dns: LoopbackDns, nats_url: str
) -> None:
    mesh = start_mesh(
        dns_resolver=dns.address,
        dns_check_poll_seconds=0.1,
        dns_check_initial_seconds=0.1,
        dns_check_max_seconds=0.5,
        dns_recheck_seconds=0.3,
        dns_timeout_seconds=2,
    )
    account_id, key = mesh.create_account()
    with mesh.client(key) as client, internal(mesh) as service:
        created = client.identity.CreateEmailIdentity(
            pb.CreateEmailIdentityRequest(email_identity="cycle.test")
        )
        publish(dns, created.dns_records)
        _wait_status(client, "cycle.test", pb.VERIFICATION_STATUS_SUCCESS)

        def signing() -> int:
            return len(
                service.identity.GetSigningConfig(
                    pb.GetSigningConfigRequest(account_id=account_id, domain="cycle.test")
                ).keys
            )

        deadline = time.monotonic() + 60
        while signing() == 0:  # the DKIM record is checked in the same pass
            assert time.monotonic() < deadline
            time.sleep(0.1)

        # A resolver failure does not fail a verified domain.
        dns.failing = True
        flaky = client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="cycle.test")
        ).identity
        assert flaky.verification_status == pb.VERIFICATION_STATUS_SUCCESS
        assert flaky.verification_info.error_type == pb.VERIFICATION_ERROR_DNS_SERVER_ERROR
        dns.failing = False

        # The records go: FAILED, no signing, no sending.
        dns.remove("_postmesh.cycle.test")
        failed = _wait_status(client, "cycle.test", pb.VERIFICATION_STATUS_FAILED)
        assert not failed.verified_for_sending_status
        assert signing() == 0
        assert rpc_error(lambda: authorize(service, account_id, "a@cycle.test"))[1] == "MESSAGE_REJECTED"

        # Back again: verified and signing without anyone asking.
        publish(dns, [r for r in created.dns_records if r.purpose == "verification"])
        _wait_status(client, "cycle.test", pb.VERIFICATION_STATUS_SUCCESS)
        assert signing() == 1
        client.identity.DeleteEmailIdentity(pb.DeleteEmailIdentityRequest(email_identity="cycle.test"))

    # DKIM_CHANGED comes with the first verification (its status turned SUCCESS in the same pass).
    changes = identity_events(nats_url, account_id, 6)
    kinds = [c.change_type for c in changes if c.change_type != Change.IDENTITY_CHANGE_TYPE_DKIM_CHANGED]
    assert kinds == [
        Change.IDENTITY_CHANGE_TYPE_CREATED,
        Change.IDENTITY_CHANGE_TYPE_VERIFIED,
        Change.IDENTITY_CHANGE_TYPE_FAILED,
        Change.IDENTITY_CHANGE_TYPE_VERIFIED,
        Change.IDENTITY_CHANGE_TYPE_DELETED,
    ]
    assert [
        c.verified_for_sending for c in changes if c.change_type != Change.IDENTITY_CHANGE_TYPE_DKIM_CHANGED
    ] == [
        False,
        True,
        False,
        True,
        False,
    ]
    assert all(c.identity == "cycle.test" for c in changes)


def test_every_identity_change_is_an_event(idmesh: MeshThread, dns: LoopbackDns, nats_url: str) -> None:
    account_id, key = idmesh.create_account()
    with idmesh.client(key) as client:
        create_verified_domain(client, dns, "events.test")
        client.identity.PutEmailIdentityPolicy(
            pb.PutEmailIdentityPolicyRequest(
                email_identity="events.test",
                policy_name="p",
                policy=json.dumps(
                    {
                        "Statement": {
                            "Effect": "Allow",
                            "Principal": {"AWS": "123456789012"},
                            "Action": "ses:SendEmail",
                        }
                    }
                ),
            )
        )
        client.identity.PutEmailIdentityMailFromAttributes(
            pb.PutEmailIdentityMailFromAttributesRequest(
                email_identity="events.test", mail_from_domain="mf.events.test"
            )
        )
        client.identity.PutEmailIdentityDkimAttributes(
            pb.PutEmailIdentityDkimAttributesRequest(email_identity="events.test", signing_enabled=False)
        )
        client.identity.DeleteEmailIdentity(pb.DeleteEmailIdentityRequest(email_identity="events.test"))
    changes = identity_events(nats_url, account_id, 7)
    kinds = [c.change_type for c in changes]
    assert kinds[0] == Change.IDENTITY_CHANGE_TYPE_CREATED
    assert kinds[-4:] == [
        Change.IDENTITY_CHANGE_TYPE_POLICY_CHANGED,
        Change.IDENTITY_CHANGE_TYPE_MAIL_FROM_CHANGED,
        Change.IDENTITY_CHANGE_TYPE_DKIM_CHANGED,
        Change.IDENTITY_CHANGE_TYPE_DELETED,
    ]
    assert Change.IDENTITY_CHANGE_TYPE_VERIFIED in kinds[1:3]
    assert [c.verified_for_sending for c in changes][-1] is False
