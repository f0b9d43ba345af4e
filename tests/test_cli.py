"""The `postmesh` command against a real mesh."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from postmesh.cli.main import main
from postmesh.testing import LOOPBACK_PROCESS_ENV, MeshThread


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_account_lifecycle_through_the_cli(
    mesh: MeshThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_ADMIN_KEY", mesh.admin_key)
    code, out, _ = _run(capsys, "account", "create", "CLI team")
    assert code == 0
    api_key = re.search(r"api key: (pm_\S+)", out)
    assert api_key, out
    monkeypatch.setenv("POSTMESH_API_KEY", api_key.group(1))

    code, out, _ = _run(capsys, "account", "whoami")
    assert code == 0 and "CLI team" in out
    code, out, _ = _run(capsys, "health")
    assert code == 0 and out.count("SERVING") == 5

    code, out, _ = _run(capsys, "account", "keys", "create", "--description", "deploy")
    new_key_id = re.search(r"key: (\w+)", out)
    assert code == 0 and new_key_id
    code, out, _ = _run(capsys, "account", "keys", "revoke", new_key_id.group(1))
    assert code == 0
    code, out, _ = _run(capsys, "account", "keys", "list", "--all", "--json")
    assert code == 0 and '"revoked": true' in out

    code, _, err = _run(capsys, "account", "keys", "revoke", "doesnotexist")
    assert code == 1 and "NOT_FOUND" in err


def test_cli_reports_bad_credentials_clearly(
    mesh: MeshThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", "pm_nope_nope")
    code, _, err = _run(capsys, "account", "whoami")
    assert code == 1
    assert "UNAUTHENTICATED [INVALID_API_KEY]" in err


def test_client_commands_do_not_load_the_server_stack() -> None:
    """`postmesh <client command>` starts fast: building the CLI imports neither SQLAlchemy, Alembic
    nor any service (only `serve`, `dev` and `config` do, when they run)."""
    probe = (
        "import sys, postmesh.cli.main as m; m.build_parser(); "
        "names = ('sqlalchemy', 'alembic', 'postmesh.common.server', 'services'); "
        "heavy = [n for n in names if n in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_dev_takes_its_ports_and_data_folder_as_flags(tmp_path: Path) -> None:
    """`postmesh dev --help` lists its flags; with them, the mesh comes up where they say, prints the
    fixed NATS URL it started, and no metrics URL when metrics are off."""
    import signal

    from postmesh.client import Client
    from postmesh.common.natsserver import free_port

    helped = subprocess.run(
        [sys.executable, "-m", "postmesh.cli.main", "dev", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    for flag in ("--listen", "--data-dir", "--nats-port", "--metrics-port", "--http-api-listen"):
        assert flag in helped.stdout
    grpc_port, nats_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "GRPC_LISTEN", "DATA_DIR")}
    env.update(LOOPBACK_PROCESS_ENV)
    # The listeners dev fixes for make run, moved off their default ports for the test.
    env.update(SMTP_STARTTLS_LISTEN="127.0.0.1:0", SMTP_TLS_LISTEN="127.0.0.1:0")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "postmesh.cli.main",
            "dev",
            "--listen",
            f"127.0.0.1:{grpc_port}",
            "--data-dir",
            str(tmp_path / "var"),
            "--nats-port",
            str(nats_port),
            "--metrics-port",
            "0",
            "--http-api-listen",
            "127.0.0.1:0",
            "--processes",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = "".join(process.stdout.readline() for _ in range(8))
        assert f"NATS:      nats://127.0.0.1:{nats_port}" in banner
        assert "metrics:" not in banner
        assert (tmp_path / "var" / "dev-secrets.env").exists()
        with Client(f"127.0.0.1:{grpc_port}") as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.health_status("", timeout=2) == "SERVING":
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "postmesh dev never became SERVING"
                time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
