"""The quota CLI end to end against a real mesh: account, quota, stats and the operator commands."""

from __future__ import annotations

import datetime as dt

import pytest

from postmesh.cli.main import main
from postmesh.cli.quota import sparkline, stats_chart
from postmesh.events.v1 import events_pb2 as ev
from postmesh.quota.v1 import quota_pb2 as pb
from postmesh.testing import MeshThread
from tests.test_quota_reputation import email_event, publish, wait_for


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_account_and_operator_commands(
    mesh: MeshThread, nats_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    account_id, key = mesh.create_account()
    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", key)
    monkeypatch.setenv("POSTMESH_ADMIN_KEY", mesh.admin_key)

    code, out, _ = run(
        capsys,
        "account", "details", "--mail-type", "transactional", "--website-url", "https://shop.example.test",
        "--use-case", "Receipts", "--contact", "ops@shop.example.test", "--expected-daily-volume", "900",
        "--request-production-access",
    )  # fmt: skip
    assert code == 0 and "PENDING" in out
    case_id = out.split("request ")[1].split(":")[0]
    code, out, _ = run(capsys, "admin", "requests", "--status", "pending")
    assert code == 0 and case_id in out and account_id in out and "https://shop.example.test" in out
    code, out, _ = run(
        capsys, "admin", "grant", case_id, "--max-24-hour-send", "10000", "--max-send-rate", "20"
    )
    assert code == 0 and f"granted: {case_id}" in out
    code, out, _ = run(capsys, "quota")
    assert code == 0 and "max 24-hour send:   10000" in out and "max send rate:      20/s" in out

    code, out, _ = run(capsys, "admin", "pause", account_id, "--reason", "abuse report")
    assert code == 0 and f"paused: {account_id}" in out
    code, out, _ = run(capsys, "account", "show")
    assert code == 0 and "SHUTDOWN (abuse report)" in out and "sending enabled:    no" in out
    assert f"production request: {case_id} GRANTED" in out
    code, out, _ = run(capsys, "admin", "accounts")
    assert code == 0 and account_id in out and "production" in out
    code, out, _ = run(capsys, "admin", "reinstate", account_id)
    assert code == 0 and "HEALTHY" in out
    code, out, _ = run(
        capsys, "admin", "set-quota", account_id, "--max-24-hour-send", "5000", "--max-send-rate", "5"
    )
    assert code == 0 and "5000/24h, 5/s" in out
    code, out, _ = run(capsys, "account", "changes")
    assert code == 0 and out.index("QUOTA") < out.index("abuse report") < out.index("PRODUCTION_ACCESS")
    code, out, _ = run(capsys, "admin", "account", account_id)
    assert code == 0 and "Reinstated by an operator." in out

    now = dt.datetime.now(dt.UTC)
    publish(nats_url, [email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, now, recipients=7)])
    with mesh.client(key) as client:
        wait_for(
            lambda: client.quota.GetSendStatistics(pb.GetSendStatisticsRequest()).send_data_points,
            lambda points: len(points) == 1,
        )
    code, out, _ = run(capsys, "stats", "--hours", "2")
    assert code == 0 and "ATTEMPTS" in out
    assert out.splitlines()[1].split()[2] == "7"  # the interval's delivery attempts
    assert "attempts   |" in out and "max 7" in out

    # Operator commands need the operator credential.
    monkeypatch.setenv("POSTMESH_ADMIN_KEY", key)
    code, _, err = run(capsys, "admin", "accounts")
    assert code == 1 and "PERMISSION_DENIED [ADMIN_ONLY]" in err
    monkeypatch.delenv("POSTMESH_ADMIN_KEY")
    with pytest.raises(SystemExit, match="POSTMESH_ADMIN_KEY"):
        main(["admin", "accounts"])


def test_chart_shapes() -> None:
    assert sparkline([0, 4, 8]) == " ▄█"
    assert sparkline([0, 0]) == "  "
    now = dt.datetime(2026, 3, 2, 10, 20, tzinfo=dt.UTC)
    point = pb.SendDataPoint(delivery_attempts=5, bounces=1)
    point.timestamp.FromDatetime(dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC))
    chart = stats_chart([point], 1, now).splitlines()
    assert chart[1] == "attempts   |  █ | max 5"  # 09:30, 09:45, 10:00, 10:15
    assert chart[2] == "bounces    |  █ | max 1"
