"""Opening the database: an Engine over one SQLite file shared by several processes.

Owns connection settings (WAL, foreign keys, busy timeout) and table creation. The API server and
the training worker each open the same file; WAL lets readers run alongside one writer, and the
busy timeout makes a writer wait for another's lock instead of failing at once.
Knows no queries; those are in `repo.py`.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from amber.store.tables import Base

BUSY_TIMEOUT_MS = 10_000


def open_database(url: str) -> Engine:
    """An Engine for `url` with every table created; makes a SQLite file's directory if missing."""
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if is_sqlite:
        event.listen(engine, "connect", _configure_sqlite)
    Base.metadata.create_all(engine)
    return engine


def _configure_sqlite(dbapi_connection, _connection_record) -> None:
    """Per-connection pragmas; foreign_keys and busy_timeout do not persist in the file."""
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")  # first, so the next ones wait too
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.close()


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit (callers get them detached)."""
    return sessionmaker(engine, expire_on_commit=False)
