"""The `amber` command as a user runs it: a real process, a real AMBER_HOME."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
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


def test_keys_can_be_named_and_list_shows_the_name(tmp_path):
    key = amber(tmp_path, "keys", "create", "alice", "--name", " ci runner ").stdout.strip().splitlines()[-1]
    listed = amber(tmp_path, "keys", "list", "alice").stdout
    assert key[:14] in listed and listed.rstrip().endswith("ci runner")
    assert amber(tmp_path, "keys", "create", "alice", "--name", "").returncode == 2


def test_bad_account_name_is_a_usage_error(tmp_path):
    out = amber(tmp_path, "keys", "create", "no spaces allowed")
    assert out.returncode == 2 and "account" in (out.stderr + out.stdout).lower()


def test_upload_train_follow_show_and_export_from_the_command_line(tmp_path, tiny_checkpoint):
    """No server: `models train` starts its own worker when none takes the job, and follows it."""
    (tmp_path / "models.toml").write_text(f'default = "tiny"\n[models.tiny]\npath = "{tiny_checkpoint}"\n'
                                          'max_context = 256\n')
    # SST-2's first 50 rows, the fewest a dataset takes: the plumbing is under test here, and
    # training and evaluation take time in proportion
    data = tmp_path / "sst2.jsonl"
    data.write_text("".join((Path(__file__).parent / "data/sst2/train.jsonl").read_text()
                            .splitlines(keepends=True)[:50]))
    out = amber(tmp_path, "datasets", "upload", str(data), "--name", "sst2", "--account", "carol")
    assert out.returncode == 0, out.stderr
    assert "50 examples (45 train, 5 validation)" in out.stdout
    assert amber(tmp_path, "datasets", "upload", str(data), "--name", "sst2", "--account", "carol").returncode != 0
    out = amber(tmp_path, "models", "train", "sst2", "--name", "cli-model", "--epochs", "1", "--account", "carol")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "cli-model: COMPLETED" in out.stdout and "exact match" in out.stdout
    shown = amber(tmp_path, "models", "show", "cli-model", "--json", "--account", "carol")
    body = json.loads(shown.stdout)
    assert body["status"] == "COMPLETED" and body["evaluation"]["examples"] == 5
    assert amber(tmp_path, "models", "show", "cli-model", "--account", "dave").returncode != 0  # private
    out = amber(tmp_path, "models", "export", "cli-model", str(tmp_path / "export"), "--account", "carol")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "export/adapter_model.safetensors").exists()


def test_a_worker_started_by_a_server_exits_when_the_server_is_gone(tmp_path):
    """`amber serve` starts its worker with --parent; a killed server leaves no worker behind."""
    server = subprocess.Popen(["sleep", "5"])  # stands in for the server
    worker = subprocess.Popen([AMBER, "worker", "--parent", str(server.pid)], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "AMBER_HOME": str(tmp_path)})
    time.sleep(3)
    assert worker.poll() is None, worker.stderr.read()  # waits for jobs while its server lives
    server.kill()
    server.wait()
    assert worker.wait(timeout=30) == 0
    assert "waiting for training jobs" in worker.stderr.read()


def test_generate_review_and_save_from_the_command_line(tmp_path, tiny_checkpoint):
    """No server: `datasets generate` starts its own worker, follows the job, and `datasets generated`
    lists the flagged rows, records decisions and saves the approved rows as a dataset."""
    (tmp_path / "models.toml").write_text(f'default = "tiny"\n[models.tiny]\npath = "{tiny_checkpoint}"\n'
                                          'max_context = 512\n')
    data = Path(__file__).parent / "data/sst2/train.jsonl"
    lines = data.read_text().splitlines()
    seeds, inputs = tmp_path / "seeds.jsonl", tmp_path / "inputs.jsonl"
    seeds.write_text("\n".join(lines[:4]) + "\n")
    inputs.write_text("\n".join(json.dumps({"prompt": json.loads(x)["prompt"]}) for x in lines[4:]) + "\n")
    bad = amber(tmp_path, "datasets", "generate", "--mode", "examples", "--examples", str(seeds))
    assert bad.returncode == 2 and "--n" in bad.stderr + bad.stdout
    out = amber(tmp_path, "datasets", "generate", "--mode", "inputs", "--examples", str(seeds), "--inputs",
                str(inputs), "--max-tokens", "2", "--account", "carol")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "96 rows" in out.stdout and "COMPLETED" in out.stdout
    with sqlite3.connect(tmp_path / "amber.db") as db:
        rows = db.execute("select idx, output from generated_rows where job_id = 1 order by idx").fetchall()
    assert [r[0] for r in rows] == list(range(1, 97))
    blank = [i for i, output in rows if not output.strip()]  # an upload refuses rows without a completion
    reject = ",".join(map(str, [1, 2, *blank]))
    listed = amber(tmp_path, "datasets", "generated", "1", "--view", "all", "--reject", reject, "--account", "carol")
    assert listed.returncode == 0, listed.stderr
    assert "96 rows" in listed.stdout
    approve = ",".join(str(i) for i, _ in rows if i not in (1, 2, *blank))
    saved = amber(tmp_path, "datasets", "generated", "1", "--approve", approve, "--save", "labelled",
                  "--account", "carol")
    assert saved.returncode == 0, saved.stderr + saved.stdout
    assert f"dataset 'labelled': id 1, {96 - 2 - len(blank)} examples" in saved.stdout


def test_a_shared_database_behind_is_refused_in_one_sentence_until_db_upgrade(tmp_path, postgres_url):
    from amber.store import migrate
    from amber.store.db import connect

    engine = connect(postgres_url)
    migrate.upgrade(engine, migrate.BASELINE)  # as an older Amber left it
    engine.dispose()
    env = {**os.environ, "AMBER_HOME": str(tmp_path), "AMBER_DATABASE_URL": postgres_url}
    run = lambda *args: subprocess.run([AMBER, *args], env=env, capture_output=True, text=True, timeout=120)
    refused = run("keys", "create", "alice")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"at revision {migrate.BASELINE}" in refused.stderr and "`amber db upgrade`" in refused.stderr
    assert "behind" in run("db", "current").stdout
    upgraded = run("db", "upgrade")
    assert upgraded.stdout.strip() == f"upgraded the database from {migrate.BASELINE} to {migrate.head()}"
    assert run("keys", "create", "alice").returncode == 0
    current = run("db", "current").stdout
    assert "postgresql+psycopg://postgres@127.0.0.1" in current and current.strip().endswith("up to date")
    assert not (tmp_path / "amber.db").exists()  # AMBER_DATABASE_URL, not the file under AMBER_HOME
