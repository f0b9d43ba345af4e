"""`postmesh send`, `postmesh send-bulk` and `postmesh template` against a real mesh."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from postmesh.cli.main import main
from postmesh.testing_mail import LoopbackDns
from tests.conftest import MeshFactory
from tests.identity_helpers import create_verified_domain
from tests.sending_helpers import own_nats_server, queued_messages
from tests.test_sending_e2e import _settings


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """Overrides the suite's shared server for this module (and start_mesh): see own_nats_server."""
    with own_nats_server(tmp_path / "nats") as url:
        yield url


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_templates_sends_and_bulk_sends_through_the_cli(
    start_mesh: MeshFactory,
    zone: LoopbackDns,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mesh = start_mesh(**_settings(zone, delivery_workers=0))
    account_id, key = mesh.create_account()
    with mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", key)

    html = tmp_path / "welcome.html"
    html.write_text("<p>Hello {{name}}</p>")
    code, out, err = _run(
        capsys,
        "template",
        "create",
        "welcome",
        "--subject",
        "Hi {{name}}",
        "--text",
        "Hello {{name}}",
        "--html",
        f"@{html}",
    )
    assert code == 0, err
    code, out, _ = _run(capsys, "template", "list")
    assert code == 0 and "welcome" in out
    code, out, _ = _run(capsys, "template", "update", "welcome", "--text", "Dear {{name}}")
    assert code == 0
    code, out, _ = _run(capsys, "template", "get", "welcome")
    assert "Dear {{name}}" in out and "<p>Hello {{name}}</p>" in out
    code, out, _ = _run(capsys, "template", "test-render", "welcome", "--data", '{"name": "Ada"}')
    assert code == 0 and "Subject: Hi Ada" in out
    code, _, err = _run(capsys, "template", "test-render", "welcome", "--data", "{}")
    assert code == 1 and "INVALID_ARGUMENT [RENDERING_FAILURE]" in err

    code, out, err = _run(
        capsys,
        "send",
        "--from",
        "News <news@example.test>",
        "--to",
        "a@example.test, b@example.test",
        "--bcc",
        "c@example.test",
        "--subject",
        "Plain",
        "--text",
        "Hello",
    )
    assert code == 0, err
    simple_id = re.search(r"queued: (\S+)", out)
    assert simple_id
    raw = tmp_path / "message.eml"
    raw.write_bytes(b"From: news@example.test\r\nTo: d@example.test\r\nSubject: raw\r\n\r\nraw\r\n")
    code, out, err = _run(capsys, "send", "--raw", str(raw))
    assert code == 0, err
    code, out, err = _run(
        capsys,
        "send",
        "--from",
        "news@example.test",
        "--to",
        "e@example.test",
        "--template",
        "welcome",
        "--data",
        '{"name": "Eve"}',
        "--tag",
        "campaign=cli",
    )
    assert code == 0, err
    # Bad input is reported with its status and reason, and exits 1.
    code, _, err = _run(
        capsys,
        "send",
        "--from",
        "news@example.test",
        "--to",
        "x@example.test",
        "--subject",
        "s",
        "--text",
        "t",
        "--cc",
        "not-an-address",
    )
    assert code == 1 and "INVALID_ARGUMENT" in err and "field=destination.cc_addresses[0]" in err
    code, _, err = _run(
        capsys,
        "send",
        "--from",
        "unknown@nowhere.test",
        "--to",
        "x@example.test",
        "--subject",
        "s",
        "--text",
        "t",
    )
    assert code == 1 and "FAILED_PRECONDITION [MESSAGE_REJECTED]" in err

    rows = tmp_path / "people.csv"
    lines = ["email,name"] + [f"p{i}@example.test,Person {i}" for i in range(60)] + ["broken,Nobody"]
    rows.write_text("\n".join(lines) + "\n")
    code, out, err = _run(
        capsys, "send-bulk", "--from", "news@example.test", "--template", "welcome", "--csv", str(rows)
    )
    assert code == 1  # one row failed
    assert "60 queued, 1 failed" in out and "broken" in out and "INVALID_PARAMETER" in out
    assert "61/61 sent, 1 failed" in err  # the progress bar's last state

    queued = queued_messages(mesh.settings.nats_url, account_id, wait_for=63)
    assert len(queued) == 63
    by_id = {q.message_id: q for q in queued}
    assert sorted(by_id[simple_id.group(1)].recipients) == [
        "a@example.test",
        "b@example.test",
        "c@example.test",
    ]
    subjects = sorted(str(message_from_bytes(q.mime, policy=policy.default)["Subject"]) for q in queued)
    assert "Hi Person 59" in subjects and "Hi Eve" in subjects and "raw" in subjects
    tagged = [q for q in queued if [(t.name, t.value) for t in q.tags] == [("campaign", "cli")]]
    assert len(tagged) == 1
    code, out, _ = _run(capsys, "template", "delete", "welcome")
    assert code == 0
    code, out, _ = _run(capsys, "template", "list", "--json")
    assert json.loads(out) == {}
