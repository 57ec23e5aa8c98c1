"""The migrations: they make exactly the tables the code declares, an older database is upgraded
(SQLite when opened; a shared PostgreSQL only by `amber db upgrade`), a revision from a newer Amber
is refused, and processes creating one database at once do it once."""
from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from amber.store import migrate
from amber.store.db import connect
from amber.store.repo import Store
from amber.store.tables import Base


def test_the_migrations_make_the_tables_the_code_declares(database_url):
    Store.open(database_url).close()
    engine = connect(database_url)
    with engine.connect() as connection:
        assert migrate.current(connection) == migrate.head()
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def at_baseline_with_jobs(url: str) -> None:
    """A database an Amber of the baseline revision used: one job run, one still queued."""
    engine = connect(url)
    assert migrate.upgrade(engine, migrate.BASELINE) == (None, migrate.BASELINE)
    with engine.begin() as db:
        db.exec_driver_sql("INSERT INTO accounts (id, name, created_at) VALUES (1, 'alice', '2024-01-01')")
        for started in ("'2024-01-02'", "NULL"):
            db.exec_driver_sql("INSERT INTO jobs (account_id, kind, status, spec, created_at, started_at) "
                               f"VALUES (1, 'train', 'QUEUED', '{{}}', '2024-01-01', {started})")
    engine.dispose()


def test_sqlite_is_upgraded_when_opened(tmp_path):
    url = f"sqlite:///{tmp_path / 'amber.db'}"
    at_baseline_with_jobs(url)
    store = Store.open(url)
    assert [j.attempts for j in store.jobs.list(1)] == [1, 0]  # a job already started counts one
    store.close()


def test_a_shared_database_behind_is_refused_until_upgraded(postgres_url):
    at_baseline_with_jobs(postgres_url)
    with pytest.raises(migrate.SchemaMismatch) as refused:
        Store.open(postgres_url)
    assert str(refused.value) == (f"the database is at revision {migrate.BASELINE} and this Amber needs "
                                  f"{migrate.head()}; run `amber db upgrade` once (it upgrades the database "
                                  "for every host)")
    engine = connect(postgres_url)
    assert migrate.upgrade(engine) == (migrate.BASELINE, migrate.head())
    assert migrate.upgrade(engine) == (migrate.head(), migrate.head())  # again: nothing to do
    engine.dispose()
    store = Store.open(postgres_url)
    assert [j.attempts for j in store.jobs.list(1)] == [1, 0]
    store.close()


def test_a_revision_from_a_newer_amber_is_refused(database_url):
    Store.open(database_url).close()
    engine = connect(database_url)
    with engine.begin() as db:
        db.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_future'")
    with pytest.raises(migrate.SchemaMismatch, match="9999_future, which this Amber does not know .*upgrade Amber"):
        Store.open(database_url)
    with pytest.raises(migrate.SchemaMismatch, match="upgrade Amber"):
        migrate.upgrade(engine)
    engine.dispose()


def open_together(url: str, n: int = 4) -> list[Exception]:
    """`n` threads opening the database at `url` at once; what they raised."""
    start, errors = threading.Barrier(n), []

    def open_it() -> None:
        start.wait()
        try:
            Store.open(url).close()
        except Exception as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_processes_creating_one_database_at_once_do_it_once(database_url):
    assert open_together(database_url) == []
    store = Store.open(database_url)
    assert store.ensure_account("alice").id == 1
    store.close()


def test_a_new_sqlite_file_opened_at_once_by_many_is_never_locked(tmp_path):
    """Switching a new file to WAL answers "database is locked" at once, without SQLite's busy
    timeout, while another connection holds the file: without db._wal's retries ~1 trial in 8
    failed, so 20 fresh files make a miss show."""
    for trial in range(20):
        assert open_together(f"sqlite:///{tmp_path / f'{trial}.db'}") == [], f"trial {trial}"
