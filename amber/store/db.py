"""Opening the database: an Engine for a URL, SQLite (one file shared by a machine's processes) or
PostgreSQL (`postgresql+psycopg://...`, shared by several hosts), checked against this Amber's schema.

Owns connection settings: on SQLite WAL, foreign keys and a busy timeout (WAL lets readers run
alongside one writer, and the busy timeout makes a writer wait for another's lock instead of
failing at once); on PostgreSQL a pool that checks a connection before use. The schema itself is
the migrations' business (`migrate.py`), which `open_database` asks before handing the engine out.
Knows no queries; those are in `repo.py` and beside it.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from amber.store import migrate

BUSY_TIMEOUT_MS = 10_000


def connect(url: str) -> Engine:
    """An Engine for `url`, not yet checked; makes a SQLite file's directory if missing."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    event.listen(engine, "connect", _configure_sqlite)
    return engine


def shown_url(url: str) -> str:
    """`url` fit to print: its password hidden."""
    return make_url(url).render_as_string(hide_password=True)


def open_database(url: str) -> Engine:
    """An Engine for `url` whose schema is this Amber's: an empty database is created, and one that
    is behind upgraded where that is this process's to do; else `migrate.SchemaMismatch`."""
    engine = connect(url)
    try:
        migrate.check(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _configure_sqlite(dbapi_connection, _connection_record) -> None:
    """Per-connection pragmas; foreign_keys and busy_timeout do not persist in the file, WAL does."""
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")  # first, so the next ones wait too
    cursor.execute("PRAGMA foreign_keys = ON")
    _wal(cursor)
    cursor.close()


def _wal(cursor) -> None:
    """Switch the file to WAL (once per file: the mode persists). Switching answers "database is
    locked" at once, without the busy timeout, while another connection holds the file, which
    processes opening a new database together do (measured: 8 of 60 trials of 4 threads failed);
    so it is retried until the busy timeout has passed."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                # a mode SQLite cannot change (":memory:" answers "memory") is kept, without an error
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def insert_for(engine: Engine):
    """The dialect's `insert`, for ON CONFLICT (SQLite's and PostgreSQL's spell it alike)."""
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit (callers get them detached)."""
    return sessionmaker(engine, expire_on_commit=False)
