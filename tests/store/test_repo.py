"""The store against real databases (a SQLite file under tmp_path, and PostgreSQL): keys, accounts, and
sharing one database between stores."""
from __future__ import annotations

import hashlib
import sqlite3
import threading
from datetime import datetime, timedelta, timezone

import pytest

from amber.store.db import BUSY_TIMEOUT_MS
from amber.store.repo import PREFIX_CHARS, AccountInfo, Store


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "home" / "amber.db"  # the directory does not exist yet


@pytest.fixture
def file_store(db_path):
    """SQLite only: a store whose file the test reads."""
    s = Store.open(f"sqlite:///{db_path}")
    yield s
    s.close()


def test_create_key_then_look_it_up(store):
    key = store.create_key("alice")
    assert key.startswith("amber-") and len(key) > 40
    account = store.account_for_key(key)
    assert account == AccountInfo(id=account.id, name="alice")
    assert store.get_account("alice") == account
    assert store.get_account("nobody") is None
    assert store.create_key("alice") != key
    assert store.get_account("alice") == account  # a second key, not a second account


def test_only_the_hash_is_stored(file_store, db_path):
    store = file_store
    key = store.create_key("alice")
    with sqlite3.connect(db_path) as raw:
        rows = raw.execute("SELECT * FROM api_keys").fetchall()
    assert len(rows) == 1
    assert hashlib.sha256(key.encode()).hexdigest() in rows[0]
    assert not any(key in str(value) for value in rows[0])
    store.close()
    files = [p for p in db_path.parent.iterdir() if p.name.startswith("amber.db")]
    data = b"".join(p.read_bytes() for p in files)  # the WAL too, where fresh writes live
    secret = key[PREFIX_CHARS:].encode()
    assert data and key.encode() not in data and secret not in data


def test_unknown_and_revoked_keys_find_nothing(store):
    key = store.create_key("alice")
    other = store.create_key("alice")
    assert store.account_for_key("amber-not-a-real-key") is None
    assert store.account_for_key("") is None
    assert store.account_for_key(key[:PREFIX_CHARS]) is None  # the prefix is not a key
    assert store.revoke_key(key) is True
    assert store.account_for_key(key) is None
    assert store.revoke_key(key) is False  # already revoked
    assert store.account_for_key(other).name == "alice"
    assert store.revoke_key(other[:PREFIX_CHARS]) is True
    assert store.account_for_key(other) is None
    assert store.revoke_key("amber-nonexistent") is False


def test_list_keys_shows_prefixes_times_and_revocation(store):
    before = datetime.now(timezone.utc)
    first, second = store.create_key("alice"), store.create_key("alice")
    store.revoke_key(first)
    keys = store.list_keys("alice")
    assert [(k.prefix, k.revoked) for k in keys] == [
        (first[:PREFIX_CHARS], True), (second[:PREFIX_CHARS], False)]
    for k in keys:
        assert before - timedelta(seconds=1) <= k.created_at <= datetime.now(timezone.utc)
    assert store.list_keys("nobody") == []


def test_an_ambiguous_prefix_revokes_nothing(store):
    key = store.create_key("alice")
    with store.engine.begin() as raw:  # a second key that happens to share the prefix
        raw.exec_driver_sql("INSERT INTO api_keys (account_id, key_hash, prefix, created_at) "
                            "SELECT account_id, 'x', prefix, created_at FROM api_keys")
    with pytest.raises(ValueError, match="matches 2 active keys"):
        store.revoke_key(key[:PREFIX_CHARS])
    assert store.account_for_key(key).name == "alice"
    assert store.revoke_key(key) is True  # the full key is never ambiguous


def test_accounts_are_isolated(store):
    alice, bob = store.create_key("alice"), store.create_key("bob@example.com")
    a, b = store.account_for_key(alice), store.account_for_key(bob)
    assert (a.name, b.name) == ("alice", "bob@example.com") and a.id != b.id
    assert [k.prefix for k in store.list_keys("alice")] == [alice[:PREFIX_CHARS]]
    assert [k.prefix for k in store.list_keys("bob@example.com")] == [bob[:PREFIX_CHARS]]
    store.revoke_key(alice)
    assert store.account_for_key(bob) == b


def test_reopening_keeps_data(store, url):
    key = store.create_key("alice")
    revoked = store.create_key("alice")
    store.revoke_key(revoked)
    store.close()
    again = Store.open(url)
    try:
        assert again.account_for_key(key).name == "alice"
        assert again.account_for_key(revoked) is None
        assert len(again.list_keys("alice")) == 2
    finally:
        again.close()


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "semi;colon", "ünï", "new\nline",
                                  "a/b", "trailing\n"])
def test_invalid_account_names_are_rejected(store, name):
    for call in (store.create_key, store.get_account, store.list_keys):
        with pytest.raises(ValueError, match="invalid account name"):
            call(name)
    assert store.list_keys("ok") == []


@pytest.mark.parametrize("name", ["a", "a" * 64, "first.last-2_x@host.io"])
def test_valid_account_names_are_accepted(store, name):
    assert store.account_for_key(store.create_key(name)).name == name


def test_two_stores_on_one_database_see_each_others_writes(store, url):
    server = Store.open(url)  # as the API server and the worker would
    try:
        key = store.create_key("alice")
        assert server.account_for_key(key).name == "alice"
        assert server.revoke_key(key) is True
        assert store.account_for_key(key) is None
        key2 = server.create_key("alice")
        assert store.account_for_key(key2) == server.get_account("alice")
    finally:
        server.close()


def test_concurrent_writers_share_one_account(store, url):
    other = Store.open(url)
    keys, errors = [], []

    def make(s):
        try:
            keys.extend(s.create_key("shared") for _ in range(5))
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=make, args=(s,)) for s in [store, other] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert errors == []
    assert len({store.account_for_key(k) for k in keys}) == 1 and len(keys) == 40
    assert len(store.list_keys("shared")) == 40


def test_connections_use_wal_foreign_keys_and_a_busy_timeout(file_store):
    with file_store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == BUSY_TIMEOUT_MS
        with pytest.raises(Exception, match="FOREIGN KEY"):
            conn.exec_driver_sql("INSERT INTO api_keys (account_id, key_hash, prefix, created_at)"
                                 " VALUES (999, 'h', 'p', '2024-01-01')")
