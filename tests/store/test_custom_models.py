"""Datasets and custom models in the store: ids never reused, models counted per account, a deleted
dataset reported, rows in batches, and a file made before AUTOINCREMENT brought up to date."""
from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import MetaData, create_engine

from amber.store.custom_models import INSERT_BATCH, ExampleRow
from amber.store.repo import Store
from amber.store.tables import Base


def dataset(store, account: int, name: str, n: int = 3):
    rows = [ExampleRow(i + 1, "train" if i else "validation", f"p{i}", f"c{i}") for i in range(n)]
    return store.datasets.create(account, name, "f.jsonl", 10, "prompt_completion", rows, {})


def model(store, account: int, name: str, on):
    return store.custom_models.create(account, name, "tiny", "tiny", on, 0.1, 1, {})


def test_ids_are_never_reused_after_a_delete(store):
    alice, bob = store.ensure_account("alice").id, store.ensure_account("bob").id
    first = dataset(store, alice, "d")
    used = model(store, alice, "m", first)
    assert store.datasets.delete(alice, first.id) and store.custom_models.delete(alice, used.id)
    assert dataset(store, bob, "d").id > first.id
    assert model(store, bob, "m", first).id > used.id


def test_a_dataset_counts_only_its_own_accounts_models(store):
    alice, bob = store.ensure_account("alice").id, store.ensure_account("bob").id
    mine, theirs = dataset(store, alice, "d"), dataset(store, bob, "d")
    model(store, alice, "m", mine)
    with store.engine.begin() as db:  # as a model left from a reused id would
        db.exec_driver_sql(f"UPDATE custom_models SET dataset_id = {theirs.id}")
    assert store.datasets.get(bob, theirs.id).num_models_used == 0
    assert store.custom_models.list(alice)[0].dataset_deleted  # alice has no dataset of that id


def test_a_model_says_when_its_dataset_is_deleted(store):
    alice = store.ensure_account("alice").id
    d = dataset(store, alice, "d")
    m = model(store, alice, "m", d)
    assert store.datasets.get(alice, d.id).num_models_used == 1
    assert not store.custom_models.get(alice, m.id).dataset_deleted
    store.datasets.delete(alice, d.id)
    for found in (store.custom_models.get(alice, m.id), store.custom_models.find(alice, "m"),
                  store.custom_models.find(alice, str(m.id)), store.custom_models.list(alice)[0],
                  store.custom_models.set_default_epoch(alice, m.id, 1)):
        assert found.dataset_deleted and found.dataset_id == d.id
    assert store.custom_models.set_default_epoch(store.ensure_account("bob").id, m.id, 1) is None


def test_rows_go_in_in_batches_and_come_back_in_order(store):
    alice = store.ensure_account("alice").id
    d = dataset(store, alice, "big", INSERT_BATCH * 2 + 7)
    got = store.datasets.rows(d.id)
    assert [r.source_row for r in got] == list(range(1, INSERT_BATCH * 2 + 8))
    assert (d.num_examples, d.validation_examples) == (INSERT_BATCH * 2 + 7, 1)


def test_a_failing_then_keeps_nothing(store):
    alice = store.ensure_account("alice").id

    def fail(dataset_id: int) -> None:
        raise OSError("no room")

    with pytest.raises(OSError):
        store.datasets.create(alice, "d", "f", 1, "prompt_completion", [ExampleRow(1, "train", "p", "c")], {},
                              then=fail)
    assert store.datasets.list(alice) == []
    placed = []
    d = store.datasets.create(alice, "d", "f", 1, "prompt_completion", [ExampleRow(1, "train", "p", "c")], {},
                              then=placed.append)
    assert placed == [d.id] and len(store.datasets.rows(d.id)) == 1


def old_database(url: str) -> None:
    """The schema as Amber made it before AUTOINCREMENT, with alice's datasets 1-3, their rows, and
    a model trained on dataset 5, since deleted."""
    old = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(old).dialect_options["sqlite"]["autoincrement"] = False
    engine = create_engine(url)
    old.create_all(engine)
    engine.dispose()
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        db.execute("ALTER TABLE jobs DROP COLUMN attempts")  # a later revision's
        db.execute("INSERT INTO accounts (id, name, created_at) VALUES (1, 'alice', '2024-01-01')")
        for i in (1, 2, 3):
            db.execute("INSERT INTO datasets (id, account_id, name, file_name, size_bytes, format, num_examples, "
                       "train_examples, validation_examples, report, created_at) VALUES (?, 1, ?, 'f', 1, "
                       "'prompt_completion', 1, 1, 0, '{}', '2024-01-01')", (i, f"d{i}"))
            db.execute("INSERT INTO dataset_rows (dataset_id, source_row, split, prompt, completion) "
                       "VALUES (?, 1, 'train', 'p', 'c')", (i,))
        db.execute("INSERT INTO custom_models (id, account_id, name, base_model, model_type, dataset_id, "
                   "dataset_name, status, learning_rate, num_epochs, settings, epochs, created_at) VALUES "
                   "(4, 1, 'm', 'tiny', 'tiny', 5, 'gone', 'COMPLETED', 0.1, 1, '{}', '[]', '2024-01-01')")


def test_a_database_from_before_autoincrement_is_rebuilt_keeping_everything(tmp_path):
    url = f"sqlite:///{tmp_path / 'amber.db'}"  # SQLite only: such files were SQLite's
    old_database(url)
    store = Store.open(url)
    try:
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            schema = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
            indexes = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "AUTOINCREMENT" in schema["datasets"] and "AUTOINCREMENT" in schema["custom_models"]
        assert {"ix_datasets_account_id", "ix_custom_models_account_id", "ix_custom_models_status"} <= indexes
        assert [d.name for d in store.datasets.list(1)] == ["d1", "d2", "d3"]
        assert all(len(store.datasets.rows(i)) == 1 for i in (1, 2, 3))  # no cascade when the old table went
        assert store.custom_models.get(1, 4).dataset_deleted
        assert dataset(store, 1, "new").id == 6  # past the deleted dataset 5 that model 4 still names
        assert store.datasets.delete(1, 1) and store.datasets.rows(1) == []  # foreign keys still cascade
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        store.close()
    again = Store.open(url)  # a second opening has nothing left to do
    assert [d.name for d in again.datasets.list(1)] == ["d2", "d3", "new"]
    again.close()


def test_models_on_a_base_are_found_across_accounts_with_their_account(store):
    alice, bob = store.ensure_account("alice").id, store.ensure_account("bob").id
    a, b = model(store, alice, "a", dataset(store, alice, "d")), model(store, bob, "b", dataset(store, bob, "d"))
    store.custom_models.create(alice, "elsewhere", "other-base", "other-base", dataset(store, alice, "e"), 0.1, 1, {})
    assert [(account, m.id) for account, m in store.custom_models.on_base("tiny")] == [("alice", a.id), ("bob", b.id)]
    assert store.custom_models.on_base("nothing") == []
