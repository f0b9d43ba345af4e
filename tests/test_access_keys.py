"""SigV4 access keys: issued once, stored only as an encrypted digest, verified by identity."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postmesh.cli.main import main
from postmesh.common import sigv4
from postmesh.identity.v1 import identity_pb2 as pb
from postmesh.testing import MeshThread
from services.identity.accesskeys import new_access_key_id, new_secret
from services.identity.dkimkeys import MasterKeys
from tests.conftest import MeshFactory
from tests.identity_helpers import internal, rpc_error


def _aws_reference_signature(secret: str, date: str, region: str, service: str, to_sign: str) -> str:
    """SigV4 as AWS documents it, starting from the secret itself."""

    def step(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    key = step(step(step(step(f"AWS4{secret}".encode(), date), region), service), "aws4_request")
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


@settings(max_examples=50, deadline=None)
@given(
    date=st.from_regex(r"\A20[0-9]{6}\Z"),
    region=st.text(min_size=1, max_size=20),
    service=st.sampled_from(["ses", "email"]),
    to_sign=st.text(max_size=300),
)
def test_the_stored_digest_signs_exactly_like_the_secret(
    date: str, region: str, service: str, to_sign: str
) -> None:
    secret = new_secret()
    assert len(secret) == 64  # "AWS4" + secret exceeds SHA-256's block: HMAC hashes such keys first
    material = sigv4.key_material(secret)
    assert material != f"AWS4{secret}".encode()
    assert sigv4.signature(material, date, region, service, to_sign) == _aws_reference_signature(
        secret, date, region, service, to_sign
    )


def test_access_key_ids_look_like_aws_ones() -> None:
    ids = {new_access_key_id() for _ in range(100)}
    assert len(ids) == 100
    for key_id in ids:
        assert key_id.startswith("AKPM") and len(key_id) == 20
        assert key_id[4:].isupper() or key_id[4:].isalnum()
        assert set(key_id[4:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def _verify(service: object, key_id: str, secret: str, to_sign: str = "AWS4-HMAC-SHA256\nx") -> object:
    signature = _aws_reference_signature(secret, "20261201", "eu-west-1", "ses", to_sign)
    return service.identity.VerifyAccessKeySignature(  # type: ignore[attr-defined]
        pb.VerifyAccessKeySignatureRequest(
            access_key_id=key_id,
            scope_date="20261201",
            scope_region="eu-west-1",
            scope_service="ses",
            string_to_sign=to_sign,
            signature=signature,
        )
    )


def test_create_list_verify_and_revoke(mesh: MeshThread) -> None:
    account_id, api_key = mesh.create_account()
    other_id, other_key = mesh.create_account("other")
    with mesh.client(api_key) as client, internal(mesh) as service, mesh.client(other_key) as other:
        created = client.identity.CreateAccessKey(pb.CreateAccessKeyRequest(description="ci"))
        key_id, secret = created.access_key.access_key_id, created.secret_access_key
        listed = client.identity.ListAccessKeys(pb.ListAccessKeysRequest())
        assert [k.access_key_id for k in listed.access_keys] == [key_id]
        assert other.identity.ListAccessKeys(pb.ListAccessKeysRequest()).access_keys == []

        reply = _verify(service, key_id, secret)
        assert reply.account_id == account_id  # type: ignore[attr-defined]
        assert reply.account_id != other_id  # type: ignore[attr-defined]

        code, reason, _, _ = rpc_error(lambda: _verify(service, key_id, "x" * 64))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_SIGNATURE")
        code, reason, _, _ = rpc_error(lambda: _verify(service, "AKPMAAAAAAAAAAAAAAAA", secret))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNRECOGNIZED_CLIENT")
        # Accounts cannot verify signatures themselves, nor revoke each other's keys.
        code, _, _, _ = rpc_error(lambda: _verify(client, key_id, secret))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _, _, _ = rpc_error(
            lambda: other.identity.RevokeAccessKey(pb.RevokeAccessKeyRequest(access_key_id=key_id))
        )
        assert code == grpc.StatusCode.NOT_FOUND

        client.identity.RevokeAccessKey(pb.RevokeAccessKeyRequest(access_key_id=key_id))
        code, reason, _, _ = rpc_error(lambda: _verify(service, key_id, secret))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "ACCESS_KEY_REVOKED")
        assert client.identity.ListAccessKeys(pb.ListAccessKeysRequest()).access_keys == []
        revoked = client.identity.ListAccessKeys(pb.ListAccessKeysRequest(include_revoked=True)).access_keys
        assert [(k.access_key_id, k.revoked) for k in revoked] == [(key_id, True)]


def test_the_secret_is_not_stored(mesh: MeshThread) -> None:
    _, api_key = mesh.create_account()
    with mesh.client(api_key) as client:
        secret = client.identity.CreateAccessKey(pb.CreateAccessKeyRequest()).secret_access_key
    database = Path(mesh.settings.database_url("identity").split("///", 1)[1])
    files = [p for p in database.parent.iterdir() if p.name.startswith(database.name)]
    content = b"".join(p.read_bytes() for p in files)
    assert b"access_keys" in content
    assert secret.encode() not in content
    assert sigv4.key_material(secret) not in content
    assert sigv4.key_material(secret).hex().encode() not in content


def test_access_keys_survive_a_master_key_rotation(start_mesh: MeshFactory, tmp_path: Path) -> None:
    old_key, new_key = MasterKeys.generate("old"), MasterKeys.generate("new")
    data_dir = tmp_path / "rotating"
    mesh = start_mesh(dkim_master_keys=old_key, data_dir=data_dir)
    account_id, api_key = mesh.create_account()
    with mesh.client(api_key) as client:
        created = client.identity.CreateAccessKey(pb.CreateAccessKeyRequest())
    key_id, secret = created.access_key.access_key_id, created.secret_access_key
    mesh.stop()

    mesh = start_mesh(dkim_master_keys=f"{new_key},{old_key}", data_dir=data_dir)
    with mesh.admin() as admin:
        reply = admin.identity.RewrapDkimKeys(pb.RewrapDkimKeysRequest())
    assert reply.master_key_id == "new" and reply.already_current == 0
    mesh.stop()

    mesh = start_mesh(dkim_master_keys=new_key, data_dir=data_dir)
    with internal(mesh) as service:
        assert _verify(service, key_id, secret).account_id == account_id  # type: ignore[attr-defined]


def test_access_keys_through_the_cli(
    mesh: MeshThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, api_key = mesh.create_account()
    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", api_key)
    assert main(["access-keys", "create", "--description", "ci"]) == 0
    out = capsys.readouterr().out
    key_id = re.search(r"AWS_ACCESS_KEY_ID=(AKPM[A-Z2-7]{16})", out)
    secret = re.search(r"AWS_SECRET_ACCESS_KEY=(\S{64})\n", out)
    assert key_id and secret, out
    assert main(["access-keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert key_id.group(1) in listed and "ci" in listed and secret.group(1) not in listed
    assert main(["access-keys", "revoke", key_id.group(1)]) == 0
    capsys.readouterr()
    assert main(["access-keys", "list", "--all", "--json"]) == 0
    assert '"revoked": true' in capsys.readouterr().out
    assert main(["access-keys", "revoke", "AKPMAAAAAAAAAAAAAAAA"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
