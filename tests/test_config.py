"""Every setting is documented: the configuration table in docs/configuration.md is the schema's."""

from __future__ import annotations

from pathlib import Path

import pytest

from postmesh.common.config import SettingsError, load_settings, markdown_table
from postmesh.common.server import load_all_service_settings

TABLE_FILE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_readme_configuration_table_matches_the_schema() -> None:
    load_all_service_settings()
    table = markdown_table()
    assert table in TABLE_FILE.read_text(), "regenerate it: postmesh config --markdown"


def test_settings_parse_types_and_reject_bad_values() -> None:
    settings = load_settings({"METRICS_PORT": "9999", "AUTH_CACHE_SECONDS": "2.5"})
    assert settings.metrics_port == 9999 and settings.auth_cache_seconds == 2.5
    assert settings.database_url("quota").endswith("var/quota.db")
    assert (
        load_settings({"DATABASE_URL": "postgresql+asyncpg://h/db"}).database_url("sender")
        == "postgresql+asyncpg://h/db"
    )
    per_service = load_settings(
        {"DATABASE_URL": "postgresql+asyncpg://h/db", "QUOTA_DATABASE_URL": "sqlite+aiosqlite:///q.db"}
    )
    assert per_service.database_url("quota") == "sqlite+aiosqlite:///q.db"
    with pytest.raises(SettingsError, match="METRICS_PORT"):
        load_settings({"METRICS_PORT": "many"})
