"""Opening the database: an Engine over one SQLite file shared by several processes.

Owns connection settings (WAL, foreign keys, busy timeout), table creation, and bringing a file
made by an older Amber up to the current schema: tables it lacks are created, nullable columns it
lacks are added, tables are rebuilt with AUTOINCREMENT, and custom models trained before the
`jobs` table get their train job from the columns they carried. These steps are small and additive only;
real migrations (Alembic) arrive in a later issue. The API server and the training worker each open
the same file; WAL lets readers run alongside one writer, and the busy timeout makes a writer wait
for another's lock instead of failing at once.
Knows no queries; those are in `repo.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Column, Engine, MetaData, Table, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateColumn, CreateIndex, CreateTable

from amber.store.tables import Base, CustomModel, Dataset

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
    if is_sqlite:
        _add_missing_columns(engine)  # first: a rebuild copies every column the table should have
        _adopt_autoincrement(engine)
        _move_training_to_jobs(engine)
    return engine


def _configure_sqlite(dbapi_connection, _connection_record) -> None:
    """Per-connection pragmas; foreign_keys and busy_timeout do not persist in the file."""
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")  # first, so the next ones wait too
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.close()


def _missing_columns(db) -> list[Column]:
    """The known tables' columns that the file's tables lack."""
    missing = []
    for table in Base.metadata.sorted_tables:
        present = {row[1] for row in db.execute(f'PRAGMA table_info("{table.name}")')}
        missing += [c for c in table.columns if c.name not in present]
    return missing


def _add_missing_columns(engine: Engine) -> None:
    """ALTER TABLE ADD COLUMN for each nullable column a file made by an older Amber lacks. A
    missing column that cannot be null has no value for the existing rows: that needs a real
    migration, and is refused."""
    def add(db) -> None:
        for column in _missing_columns(db):
            if not column.nullable:
                raise RuntimeError(f"the database lacks {column.table.name}.{column.name}, which cannot "
                                   "be added in place; it needs a migration")
            ddl = CreateColumn(column).compile(dialect=engine.dialect)
            db.execute(f'ALTER TABLE "{column.table.name}" ADD COLUMN {ddl}')

    _upgrade(engine, lambda db: bool(_missing_columns(db)), add)


def _upgrade(engine: Engine, needed: Callable[[Any], bool], apply: Callable[[Any], None],
             foreign_keys_off: bool = False) -> None:
    """One step that brings a file made by an older Amber up to date: nothing if `needed(db)` says
    the file is current, else `apply(db)` in one BEGIN IMMEDIATE transaction after asking again
    inside it, so that of two processes opening the file at once the second does nothing.
    `foreign_keys_off`: enforcement off meanwhile (a no-op inside a transaction, so set first)."""
    raw = engine.raw_connection()
    db, isolation = raw.driver_connection, raw.driver_connection.isolation_level
    try:
        if not needed(db):
            return
        db.isolation_level = None  # autocommit: the transaction below is the explicit one
        if foreign_keys_off:
            db.execute("PRAGMA foreign_keys = OFF")
        db.execute("BEGIN IMMEDIATE")
        try:
            if needed(db):
                apply(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        if foreign_keys_off:
            db.execute("PRAGMA foreign_keys = ON")
        db.isolation_level = isolation
        raw.close()


def _autoincrement_tables() -> list[Table]:
    return [t for t in Base.metadata.sorted_tables if t.dialect_options["sqlite"]["autoincrement"]]


def _has_autoincrement(db, table: str) -> bool:
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    return "AUTOINCREMENT" in sql.upper()


def _adopt_autoincrement(engine: Engine) -> None:
    """Rebuild tables that a file made before they had AUTOINCREMENT still has without it (SQLite
    cannot add it in place), foreign-key enforcement off meanwhile so that dropping the old table
    deletes no rows that point at it."""
    def rebuild(db) -> None:
        for table in _autoincrement_tables():
            if not _has_autoincrement(db, table.name):
                _rebuild(db, table, engine)
        assert not db.execute("PRAGMA foreign_key_check").fetchall()

    _upgrade(engine, lambda db: not all(_has_autoincrement(db, t.name) for t in _autoincrement_tables()),
             rebuild, foreign_keys_off=True)


def _rebuild(db, table: Table, engine: Engine) -> None:
    """SQLite's recipe for a changed table: create it anew beside the old, copy, drop, rename.
    Its id counter then starts past every id still in use anywhere: a custom model keeps the id of
    a dataset deleted before now, and that id must not name a new dataset."""
    scratch = MetaData()  # the same tables, so that the copy's foreign keys resolve
    for other in Base.metadata.sorted_tables:
        other.to_metadata(scratch)
    new = table.to_metadata(scratch, name=f"{table.name}_new")
    columns = ", ".join(f'"{c.name}"' for c in table.columns)
    indexes = db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
                         (table.name,)).fetchall()
    for (index,) in indexes:
        db.execute(f'DROP INDEX "{index}"')
    db.execute(str(CreateTable(new).compile(dialect=engine.dialect)))
    db.execute(f'INSERT INTO "{new.name}" ({columns}) SELECT {columns} FROM "{table.name}"')
    db.execute(f'DROP TABLE "{table.name}"')
    db.execute(f'ALTER TABLE "{new.name}" RENAME TO "{table.name}"')
    for index in table.indexes:
        db.execute(str(CreateIndex(index).compile(dialect=engine.dialect)))
    used = [f'SELECT max(id) FROM "{table.name}"']
    if table is Dataset.__table__:
        used.append(f"SELECT max(dataset_id) FROM {CustomModel.__tablename__}")
    (last,) = db.execute(f"SELECT max(coalesce(({used[0]}), 0), coalesce(({used[-1]}), 0))").fetchone()
    db.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table.name,))
    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table.name, last))


# A custom model's job bookkeeping, copied into its train job; status "JOB" marks a row done.
_LEGACY = "status <> 'JOB'"
_COPY_TO_JOBS = f"""
INSERT INTO jobs (account_id, kind, status, spec, progress, failure, worker, heartbeat_at, created_at,
                  started_at, finished_at)
SELECT account_id, 'train', CASE status WHEN 'TRAINING' THEN 'RUNNING' ELSE status END,
       json_object('custom_model_id', id), progress, failure, worker, heartbeat_at, created_at,
       started_at, finished_at
FROM custom_models WHERE {_LEGACY} ORDER BY id"""


def _move_training_to_jobs(engine: Engine) -> None:
    """Give each custom model made before `jobs` its train job, once: a model mid-training is
    RUNNING under its old worker, so the next worker takes it over as it would have."""
    def move(db) -> None:
        db.execute(_COPY_TO_JOBS)
        db.execute(f"UPDATE custom_models SET status = 'JOB', progress = NULL, failure = NULL, worker = NULL, "
                   f"heartbeat_at = NULL, started_at = NULL, finished_at = NULL WHERE {_LEGACY}")

    _upgrade(engine, lambda db: db.execute(f"SELECT 1 FROM custom_models WHERE {_LEGACY} LIMIT 1").fetchone()
             is not None, move)


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit (callers get them detached)."""
    return sessionmaker(engine, expire_on_commit=False)
