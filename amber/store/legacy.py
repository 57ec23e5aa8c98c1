"""Adopting a SQLite file made by an Amber from before migrations: the in-place steps that bring it
to the baseline revision, after which `migrate.py` stamps it there and upgrades it like any other.

Such a file may lack whole tables, nullable columns, AUTOINCREMENT (added later to tables whose ids
the API shows), or the `jobs` table its custom models' training now lives in. The steps create,
add, rebuild and copy what is missing, each in one BEGIN IMMEDIATE transaction that asks again
inside whether it is needed. The shape they aim at is the baseline revision itself, applied to a
scratch in-memory database and read back, so that later revisions never leak in here.
SQLite only, and only for such files; everything else goes through the migrations.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import Column, Connection, Engine, MetaData, create_engine
from sqlalchemy.schema import CreateColumn


@dataclass(frozen=True)
class Baseline:
    tables: dict[str, str]                 # name -> CREATE TABLE, as SQLite keeps it
    indexes: dict[str, tuple[str, str]]    # name -> (table, CREATE INDEX)
    columns: dict[str, list[Column]]       # table -> its columns, read back


def baseline(apply: Callable[[Connection], None]) -> Baseline:
    """The schema `apply` (the baseline revision) makes in an empty in-memory database."""
    scratch = create_engine("sqlite://")
    with scratch.begin() as connection:
        apply(connection)
        master = connection.exec_driver_sql("SELECT type, name, tbl_name, sql FROM sqlite_master "
                                            "WHERE sql IS NOT NULL AND name <> 'alembic_version'").all()
        shape = MetaData()
        shape.reflect(connection)
    scratch.dispose()
    tables = {name: sql for kind, name, _, sql in master if kind == "table" and name != "sqlite_sequence"}
    return Baseline(tables, {name: (table, sql) for kind, name, table, sql in master if kind == "index"},
                    {name: list(shape.tables[name].columns) for name in tables})


def adopt(engine: Engine, apply_baseline: Callable[[Connection], None]) -> None:
    """Bring a file made before migrations to the baseline (the caller holds the upgrade lock)."""
    shape = baseline(apply_baseline)
    _create_missing_tables(engine, shape)
    _add_missing_columns(engine, shape)  # before a rebuild, which copies every column the table should have
    _adopt_autoincrement(engine, shape)
    _move_training_to_jobs(engine)


def _step(engine: Engine, needed: Callable[[Any], bool], apply: Callable[[Any], None],
          foreign_keys_off: bool = False) -> None:
    """Nothing if `needed(db)` says the file is current, else `apply(db)` in one BEGIN IMMEDIATE
    transaction after asking again inside it. `foreign_keys_off`: enforcement off meanwhile (a
    no-op inside a transaction, so set first)."""
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


def _table_names(db) -> set[str]:
    return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _create_missing_tables(engine: Engine, shape: Baseline) -> None:
    def create(db) -> None:
        missing = set(shape.tables) - _table_names(db)
        for name, sql in shape.tables.items():
            if name in missing:
                db.execute(sql)
        for table, sql in shape.indexes.values():
            if table in missing:
                db.execute(sql)

    _step(engine, lambda db: bool(set(shape.tables) - _table_names(db)), create)


def _missing_columns(db, shape: Baseline) -> list[Column]:
    missing = []
    for table, columns in shape.columns.items():
        present = {row[1] for row in db.execute(f'PRAGMA table_info("{table}")')}
        missing += [c for c in columns if c.name not in present]
    return missing


def _add_missing_columns(engine: Engine, shape: Baseline) -> None:
    """ALTER TABLE ADD COLUMN for each nullable column the file lacks. A missing column that cannot
    be null has no value for the existing rows, and is refused."""
    def add(db) -> None:
        for column in _missing_columns(db, shape):
            if not column.nullable:
                raise RuntimeError(f"the database lacks {column.table.name}.{column.name}, which cannot "
                                   "be added in place; it needs a migration")
            ddl = CreateColumn(column).compile(dialect=engine.dialect)
            db.execute(f'ALTER TABLE "{column.table.name}" ADD COLUMN {ddl}')

    _step(engine, lambda db: bool(_missing_columns(db, shape)), add)


def _has_autoincrement(db, table: str) -> bool:
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    return "AUTOINCREMENT" in sql.upper()


def _adopt_autoincrement(engine: Engine, shape: Baseline) -> None:
    """Rebuild tables the file still has without AUTOINCREMENT (SQLite cannot add it in place),
    foreign-key enforcement off meanwhile so that dropping the old table deletes no rows that
    point at it."""
    wanted = [name for name, sql in shape.tables.items() if "AUTOINCREMENT" in sql.upper()]

    def rebuild(db) -> None:
        for table in wanted:
            if not _has_autoincrement(db, table):
                _rebuild(db, table, shape)
        assert not db.execute("PRAGMA foreign_key_check").fetchall()

    _step(engine, lambda db: not all(_has_autoincrement(db, t) for t in wanted), rebuild, foreign_keys_off=True)


def _rebuild(db, table: str, shape: Baseline) -> None:
    """SQLite's recipe for a changed table: create it anew beside the old, copy, drop, rename.
    Its id counter then starts past every id still in use anywhere: a custom model keeps the id of
    a dataset deleted before now, and that id must not name a new dataset."""
    new = f"{table}_new"
    columns = ", ".join(f'"{c.name}"' for c in shape.columns[table])
    indexes = db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
                         (table,)).fetchall()
    for (index,) in indexes:
        db.execute(f'DROP INDEX "{index}"')
    db.execute(re.sub(rf'^CREATE TABLE "?{table}"?', f'CREATE TABLE "{new}"', shape.tables[table], count=1))
    db.execute(f'INSERT INTO "{new}" ({columns}) SELECT {columns} FROM "{table}"')
    db.execute(f'DROP TABLE "{table}"')
    db.execute(f'ALTER TABLE "{new}" RENAME TO "{table}"')
    for of, sql in shape.indexes.values():
        if of == table:
            db.execute(sql)
    used = [f'SELECT max(id) FROM "{table}"']
    if table == "datasets":
        used.append("SELECT max(dataset_id) FROM custom_models")
    (last,) = db.execute(f"SELECT max(coalesce(({used[0]}), 0), coalesce(({used[-1]}), 0))").fetchone()
    db.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, last))


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

    _step(engine, lambda db: db.execute(f"SELECT 1 FROM custom_models WHERE {_LEGACY} LIMIT 1").fetchone()
          is not None, move)
