"""The operator's tools for returned mail: the dry run (RPC and `postmesh admin classify`) and the
kept reports (`postmesh admin inbound list|show|retry`), against a real feedback service."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from postmesh.cli.main import main
from postmesh.common.verp import VerpKey, bounce_address
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import inbound_pb2 as pb
from tests.conftest import MeshFactory
from tests.delivery_helpers import new_account_id
from tests.inbound_helpers import deliver, inbound_port
from tests.sending_helpers import email_events

CORPUS = Path(__file__).parent / "inbound_corpus"
DOMAIN = "bounces.postmesh.test"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_classify_and_kept_reports_through_rpc_and_cli(
    start_mesh: MeshFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh = start_mesh(default_bounce_domain=DOMAIN)
    acct_admin, acct_late = new_account_id(), new_account_id()
    assert mesh.server is not None
    inbound = mesh.server.services["feedback"].inbound  # type: ignore[attr-defined]
    key = VerpKey.from_settings(mesh.settings)
    mail = ev.Mail(message_id="m-admin", destination=["full@remote.test"])
    mesh.run(inbound.messages.record(acct_admin, mail))
    sample = CORPUS / "04-postfix-dsn-mailbox-full.eml"
    verp = bounce_address("m-admin", "full@remote.test", DOMAIN, key)

    # The dry run says what would be recorded and records nothing.
    with mesh.admin() as admin:
        reply = admin.feedback.ClassifyInboundMessage(
            pb.ClassifyInboundMessageRequest(raw=sample.read_bytes(), rcpt_to=[verp])
        ).classification
        with pytest.raises(grpc.RpcError) as empty:
            admin.feedback.ClassifyInboundMessage(pb.ClassifyInboundMessageRequest(raw=b"  "))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (reply.kind, reply.format, reply.message_id, reply.account_id) == (
        pb.INBOUND_KIND_BOUNCE,
        "dsn",
        "m-admin",
        acct_admin,
    )
    [recipient] = reply.recipients
    assert (recipient.bounce_type, recipient.bounce_sub_type, recipient.status) == (
        ev.BOUNCE_TYPE_TRANSIENT,
        ev.BOUNCE_SUB_TYPE_MAILBOX_FULL,
        "5.2.2",
    )
    assert "VERP" in reply.mapping and len(reply.events) == 1
    assert email_events(mesh.settings.nats_url, acct_admin, timeout=1) == []
    _, account_key = mesh.create_account()
    with mesh.client(account_key) as user, pytest.raises(grpc.RpcError) as refused:
        user.feedback.ClassifyInboundMessage(pb.ClassifyInboundMessageRequest(raw=sample.read_bytes()))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_ADMIN_KEY", mesh.admin_key)
    code, out = _run(capsys, "admin", "classify", str(sample), "--rcpt-to", verp)
    assert code == 0 and "full@remote.test" in out and "Transient" in out and "MailboxFull" in out
    assert f"m-admin of account {acct_admin}" in out
    code, out = _run(capsys, "admin", "classify", str(CORPUS / "33-arf-abuse.eml"), "--json")
    parsed = json.loads(out)["classification"]
    assert parsed["kind"] == "INBOUND_KIND_COMPLAINT" and parsed["feedback_type"] == "abuse"
    assert parsed["reason"].startswith("no sent message has Message-ID")

    # A report for a message not known yet is kept; once the message is known, retry records it.
    late = bounce_address("m-late", "late@remote.test", DOMAIN, key)
    raw = sample.read_bytes().replace(b"full@remote.test", b"late@remote.test")
    assert deliver(inbound_port(mesh), "", [late], raw)[0] == 250
    code, out = _run(capsys, "admin", "inbound", "list", "--json")
    [kept] = json.loads(out)["reports"]
    assert "not known" in kept["reason"] and kept["rcpt_to"] == [late]
    code, out = _run(capsys, "admin", "inbound", "show", kept["report_id"])
    assert code == 0 and "not known" in out and "late@remote.test" in out
    code, out = _run(capsys, "admin", "inbound", "retry", kept["report_id"])
    assert code == 0 and out.startswith("still kept")
    mesh.run(
        inbound.messages.record(acct_late, ev.Mail(message_id="m-late", destination=["late@remote.test"]))
    )
    code, out = _run(capsys, "admin", "inbound", "retry", kept["report_id"])
    assert code == 0 and out.startswith("recorded")
    [event] = email_events(mesh.settings.nats_url, acct_late, until=lambda e: len(e) >= 1)
    assert event.email.bounce.bounce_sub_type == ev.BOUNCE_SUB_TYPE_MAILBOX_FULL
    code, out = _run(capsys, "admin", "inbound", "list")
    assert out.strip() == "no kept reports"
