"""Fixtures of the engine's tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from amber.engine import paged_ops


@pytest.fixture(scope="session")
def kernel() -> Path:
    """Amber's compiled CPU ops, built where `make setup` builds them and the engine loads them
    from (tests/conftest.py builds them first); the library's path. Skips where there is no g++:
    the ops are optional."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: Amber's CPU ops are optional and cannot be built here")
    directory = paged_ops.default_dir()
    path = paged_ops.build(directory)
    assert paged_ops.load(directory), "built but not loadable"
    return path
