"""Named keys, revoking only one's own, paging dataset rows, and a file made before `api_keys.name`
existed brought up to date in place (by one process or several at once)."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from amber.store.custom_models import ExampleRow
from amber.store.repo import PREFIX_CHARS, Store, hash_key
from tests.store.old_files import before_migrations


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "amber.db"


@pytest.fixture
def store(database_url):
    s = Store.open(database_url)
    yield s
    s.close()


def test_keys_carry_a_name_and_their_hash(store):
    plain = store.create_key("alice")
    new = store.issue_key("alice", "laptop")
    assert new.info.prefix == new.key[:PREFIX_CHARS] and new.info.name == "laptop" and not new.info.revoked
    assert store.account_for_key(new.key).name == "alice"
    keys = store.list_keys("alice")
    assert [(k.prefix, k.name, k.key_hash) for k in keys] == [
        (plain[:PREFIX_CHARS], None, hash_key(plain)), (new.info.prefix, "laptop", hash_key(new.key))]
    assert keys[1].created_at == new.info.created_at


def test_revoke_own_key_never_touches_another_accounts(store):
    alice, bob = store.create_key("alice"), store.create_key("bob")
    alice_id, bob_id = store.get_account("alice").id, store.get_account("bob").id
    assert store.revoke_own_key(alice_id, bob[:PREFIX_CHARS]) is False
    assert store.account_for_key(bob).name == "bob"
    assert store.revoke_own_key(alice_id, alice[:PREFIX_CHARS]) is True
    assert store.account_for_key(alice) is None
    assert store.revoke_own_key(alice_id, alice[:PREFIX_CHARS]) is False  # already revoked
    assert store.revoke_own_key(bob_id, bob) is False  # the full key is not a prefix


def test_dataset_rows_page_in_sql(store):
    account = store.ensure_account("alice")
    rows = [ExampleRow(i, "validation" if i % 4 == 3 else "train", f"p{i}", f"c{i}") for i in range(20)]
    d = store.datasets.create(account.id, "d", "d.jsonl", 1, "prompt_completion", rows, {})
    assert store.datasets.count_rows(d.id) == 20 and store.datasets.count_rows(d.id, "validation") == 5
    assert [r.source_row for r in store.datasets.rows(d.id, offset=5, limit=3)] == [5, 6, 7]
    assert [r.source_row for r in store.datasets.rows(d.id, "validation", offset=1, limit=2)] == [7, 11]
    assert store.datasets.rows(d.id, "train", offset=100, limit=10) == []
    assert len(store.datasets.rows(d.id)) == 20


def old_file(db_path) -> str:
    """A file as Amber made it before keys had names, holding one key."""
    s = Store.open(f"sqlite:///{db_path}")
    key = s.create_key("alice")
    s.close()
    before_migrations(db_path)
    with sqlite3.connect(db_path) as raw:
        raw.execute("ALTER TABLE api_keys DROP COLUMN name")
    return key


def columns(db_path) -> list[str]:
    with sqlite3.connect(db_path) as raw:
        return [row[1] for row in raw.execute("PRAGMA table_info(api_keys)")]


def test_an_older_file_gains_the_missing_nullable_column(db_path):
    key = old_file(db_path)
    assert "name" not in columns(db_path)
    s = Store.open(f"sqlite:///{db_path}")
    try:
        assert columns(db_path).count("name") == 1
        assert s.account_for_key(key).name == "alice"
        assert [k.name for k in s.list_keys("alice")] == [None]
        s.create_key("alice", "new")
        assert [k.name for k in s.list_keys("alice")] == [None, "new"]
    finally:
        s.close()
    Store.open(f"sqlite:///{db_path}").close()  # again: nothing left to add
    assert columns(db_path).count("name") == 1


def test_processes_opening_an_older_file_at_once_add_the_column_once(db_path):
    old_file(db_path)
    start, errors = threading.Barrier(6), []

    def open_it():
        start.wait()
        try:
            Store.open(f"sqlite:///{db_path}").close()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and columns(db_path).count("name") == 1
