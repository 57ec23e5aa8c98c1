"""Schema revisions: which one a database is at, which one this Amber's code needs (the head), and
bringing the first to the second with Alembic (configured here: no alembic.ini).

`check` runs whenever a process opens the database. An empty one is created (upgraded to the head)
at once, so a fresh `amber serve` needs no extra step; a SQLite file that is behind is upgraded too
(a file is one machine's, as before migrations existed; one made before them is adopted first,
`legacy.py`). Any other database that is behind, PostgreSQL shared by several hosts, is refused
until someone runs `amber db upgrade`, so that no host changes the schema under the others; and a
revision this Amber does not know (a newer Amber migrated it) is refused everywhere.
Upgrades hold a lock, so that two processes upgrading at once do it once: PostgreSQL's advisory
lock, or on SQLite a file lock beside the database file.
"""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, func, inspect, select

from amber.store import legacy

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001_baseline"
ADVISORY_LOCK = 0x616D626572  # "amber": one key for every Amber on a PostgreSQL server


class SchemaMismatch(RuntimeError):
    """The database's revision is not this Amber's, and this process may not change it."""


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    return _scripts().get_current_head()


def known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def current(connection: Connection) -> str | None:
    """The database's revision; None when it has none (empty, or made before migrations)."""
    return MigrationContext.configure(connection).get_current_revision()


def revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return current(connection)


def _has_tables(connection: Connection) -> bool:
    return bool(set(inspect(connection).get_table_names()) - {"alembic_version"})


def check(engine: Engine) -> None:
    """Open-time check: nothing when the database is at the head; else create or upgrade it where
    that is this process's to do (see the module's docstring), else raise SchemaMismatch."""
    with engine.connect() as connection:
        revision, empty = current(connection), not _has_tables(connection)
    if revision == head():
        return
    _refuse_unknown(revision)
    if not empty and engine.dialect.name != "sqlite":
        raise SchemaMismatch(f"the database is at revision {revision or '(none)'} and this Amber needs "
                             f"{head()}; run `amber db upgrade` once (it upgrades the database for every host)")
    upgrade(engine)


def _refuse_unknown(revision: str | None) -> None:
    if revision is not None and not known(revision):
        raise SchemaMismatch(f"the database is at revision {revision}, which this Amber does not know (its "
                             f"newest is {head()}): a newer Amber migrated it; upgrade Amber")


def upgrade(engine: Engine, to: str = "head") -> tuple[str | None, str]:
    """Bring the database to revision `to` (the head), under the lock; (revision before, after)."""
    with _locked(engine):
        with engine.connect() as connection:
            before, tables = current(connection), _has_tables(connection)
        _refuse_unknown(before)
        if before is None and tables:
            _adopt(engine)
        with engine.begin() as connection:
            command.upgrade(_config(connection), to)
            return before, current(connection)


def _adopt(engine: Engine) -> None:
    """A database with tables but no revision: a SQLite file made before migrations. Its in-place
    steps bring it to the baseline, which it is then stamped at."""
    if engine.dialect.name != "sqlite":
        raise SchemaMismatch("the database holds tables but no Amber revision (alembic_version); give Amber "
                             "an empty database")
    legacy.adopt(engine, _baseline_schema)
    with engine.begin() as connection:
        command.stamp(_config(connection), BASELINE)


def _baseline_schema(connection: Connection) -> None:
    """The baseline revision applied to `connection` (legacy.py reads the shape it made)."""
    command.upgrade(_config(connection), BASELINE)


@contextmanager
def _locked(engine: Engine):
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:  # the lock is the session's, across transactions
            connection.execute(select(func.pg_advisory_lock(ADVISORY_LOCK)))
            connection.commit()
            try:
                yield
            finally:
                connection.execute(select(func.pg_advisory_unlock(ADVISORY_LOCK)))
                connection.commit()
    elif engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        # flock: held per open file, so threads of one process exclude each other too
        with open(f"{engine.url.database}.migrate-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    else:
        yield
