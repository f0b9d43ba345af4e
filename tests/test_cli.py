"""The `postmesh` command against a real mesh."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from postmesh.cli.main import main
from postmesh.testing import MeshThread


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
