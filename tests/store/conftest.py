"""The store under test, on SQLite and on PostgreSQL alike (`database_url` is parametrized over
both in tests/conftest.py)."""
from __future__ import annotations

import pytest

from amber.store.repo import Store


@pytest.fixture
def url(database_url):
    return database_url


@pytest.fixture
def store(url):
    s = Store.open(url)
    yield s
    s.close()
