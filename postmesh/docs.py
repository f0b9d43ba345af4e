"""Rewrites the configuration table in docs/configuration.md from the settings schema (`make docs`)."""

from __future__ import annotations

import sys
from pathlib import Path

from postmesh.common.config import markdown_table
from postmesh.common.server import load_all_service_settings

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def update(path: Path) -> bool:
    load_all_service_settings()
    text = path.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    updated = f"{head}{START}\n{markdown_table()}\n{END}{tail}"
    path.write_text(updated)
    return updated != text


if __name__ == "__main__":
    changed = update(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/configuration.md"))
    print("configuration table " + ("updated" if changed else "already current"))
