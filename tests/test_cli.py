"""The `amber` command as a user runs it: a real process, a real AMBER_HOME."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

AMBER = Path(sys.executable).parent / "amber"


def amber(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AMBER, *args], env={**os.environ, "AMBER_HOME": str(home)},
                          capture_output=True, text=True, timeout=120)


def test_models_lists_the_default_registry(tmp_path):
    out = amber(tmp_path, "models")
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m-instruct" in out.stdout and "j2-light" in out.stdout and "j1-large" in out.stdout
    assert (tmp_path / "models.toml").exists()


def test_keys_create_prints_the_key_last_and_stores_only_its_hash(tmp_path):
    out = amber(tmp_path, "keys", "create", "alice")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("amber-") and len(key) > 30
    with sqlite3.connect(tmp_path / "amber.db") as db:
        rows = db.execute("select * from api_keys").fetchall()
    assert len(rows) == 1 and key not in repr(rows)
    listed = amber(tmp_path, "keys", "list", "alice")
    assert key[:14] in listed.stdout and "active" in listed.stdout
    assert amber(tmp_path, "keys", "revoke", key[:14]).returncode == 0
    assert "revoked" in amber(tmp_path, "keys", "list", "alice").stdout


def test_bad_account_name_is_a_usage_error(tmp_path):
    out = amber(tmp_path, "keys", "create", "no spaces allowed")
    assert out.returncode == 2 and "account" in (out.stderr + out.stdout).lower()
