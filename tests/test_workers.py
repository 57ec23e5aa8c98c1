"""Workers as separate hosts would run them: real `amber worker` processes on one PostgreSQL database.
Racing workers run each queued job exactly once; a worker killed mid-job (SIGKILL) has its job
finished by another, resumed from its last complete epoch; a job's heartbeat goes on while its
runner is silent."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from amber import worker as worker_module
from amber.store.custom_models import ExampleRow
from amber.store.repo import Store

WORDS = ["red", "green", "blue", "black", "white"]


@pytest.fixture
def home(tmp_path, tiny_checkpoint) -> Path:
    """An AMBER_HOME the workers share (as shared storage would be across hosts), registering `tiny`."""
    (tmp_path / "models.toml").write_text(f'default = "tiny"\n[models.tiny]\npath = "{tiny_checkpoint}"\n'
                                          'max_context = 256\n')
    return tmp_path


@pytest.fixture
def store(postgres_url):
    s = Store.open(postgres_url)
    yield s
    s.close()


def queue_models(store, count: int, epochs: int, rows: int = 8) -> list:
    """`count` custom models on `tiny`, each a queued train job; no validation rows, so no evaluation."""
    alice = store.ensure_account("alice").id
    data = [ExampleRow(i + 1, "train", f"Item {i} colour:", f" {WORDS[i % 5]}") for i in range(rows)]
    dataset = store.datasets.create(alice, "colours", "c.jsonl", 1, "prompt_completion", data, {})
    return [store.custom_models.create(alice, f"m{i}", "tiny", "tiny", dataset, 1e-3, epochs, {})
            for i in range(count)]


def start_worker(home: Path, url: str) -> subprocess.Popen:
    env = {**os.environ, "AMBER_HOME": str(home), "AMBER_DATABASE_URL": url, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "amber.cli", "worker", "--stale-after", "5",
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def stop(workers: list[subprocess.Popen]) -> str:
    for w in workers:
        if w.poll() is None:
            w.terminate()
    return "".join(w.communicate(timeout=30)[1] for w in workers)


def test_racing_workers_run_each_job_exactly_once(home, store, postgres_url):
    models = queue_models(store, 5, epochs=1)
    alice = models[0].account_id
    workers = [start_worker(home, postgres_url) for _ in range(3)]
    try:
        wait_until(lambda: all(j.status not in ("QUEUED", "RUNNING") for j in store.jobs.list(alice)), 180,
                   "five jobs to finish")
    finally:
        log = stop(workers)
    jobs = store.jobs.list(alice)
    assert [(j.status, j.attempts) for j in jobs] == [("COMPLETED", 1)] * 5, log
    assert all(store.custom_models.get(alice, m.id).status == "COMPLETED" for m in models)
    names = {f"{socket.gethostname()}:{w.pid}" for w in workers}
    assert {j.worker for j in jobs} <= names


def test_a_killed_workers_job_is_resumed_by_another(home, store, postgres_url):
    [model] = queue_models(store, 1, epochs=3, rows=48)
    alice = model.account_id
    workers = {w.pid: w for w in (start_worker(home, postgres_url) for _ in range(2))}
    try:
        wait_until(lambda: (store.custom_models.get(alice, model.id).current_epoch or 0) >= 1, 180,
                   "the first epoch")
        epoch_one = home / "custom-models" / str(model.id) / "epoch-1" / "adapter_model.safetensors"
        saved = epoch_one.stat().st_mtime_ns
        first = workers[int(store.jobs.get(alice, model.job_id).worker.rpartition(":")[2])]
        [second] = [w for w in workers.values() if w is not first]
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert store.jobs.get(alice, model.job_id).status in ("RUNNING", "COMPLETED")  # not cancelled, say
        done = wait_until(lambda: (j := store.jobs.get(alice, model.job_id)).status != "RUNNING" and j, 180,
                          "the job to finish")
    finally:
        log = stop(list(workers.values()))
    assert (done.status, done.attempts, done.worker) == ("COMPLETED", 2, f"{socket.gethostname()}:{second.pid}"), log
    assert epoch_one.stat().st_mtime_ns == saved  # epoch 1 was not trained again: resumed after it
    assert [e["epoch"] for e in store.custom_models.get(alice, model.id).epochs] == [1, 2, 3]


def test_the_heartbeat_goes_on_while_a_runner_is_silent(store, monkeypatch):
    """A job whose runner reports nothing for a while (a long evaluation) is not taken for dead."""
    alice = store.ensure_account("alice").id
    monkeypatch.setattr(worker_module, "RUNNERS", dict(worker_module.RUNNERS))
    job = store.jobs.create(alice, "quiet", {})
    worker = worker_module.Worker.__new__(worker_module.Worker)
    worker.store, worker.name, worker.stale_after = store, "elsewhere:1", timedelta(seconds=1)

    def quiet(w, job) -> None:
        for _ in range(4):  # 1.2 s without a report, past the 1 s a silent job is taken over after
            time.sleep(0.3)
            # another host's worker, judging by the heartbeat alone, finds nothing to take over
            assert store.jobs.claim("other:2", lambda _: True, timedelta(seconds=1)) is None
        w.store.jobs.complete(job.id, w.name, {})

    worker_module.register_runner("quiet", quiet)
    worker.run_job(store.jobs.claim(worker.name, lambda _: True, worker.stale_after))
    assert store.jobs.get(alice, job.id).status == "COMPLETED"
    assert not [t for t in threading.enumerate() if t.name.startswith("amber-heartbeat")]
