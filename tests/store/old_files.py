"""SQLite files as an Amber from before migrations left them, made from one the current Amber made."""
from __future__ import annotations

import sqlite3
from pathlib import Path


def before_migrations(path: Path | str) -> None:
    """No alembic_version, and nothing a revision after the baseline added."""
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE alembic_version")
        db.execute("ALTER TABLE jobs DROP COLUMN attempts")
