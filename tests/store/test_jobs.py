"""Jobs in the store: racing workers each get distinct jobs, a dead or silent worker's job is taken
over, cancelling stops a worker's reports, a custom model reads its status from its train job, a
job of a kind no runner knows fails cleanly, and models from before `jobs` get theirs."""
from __future__ import annotations

import sqlite3
import threading
from datetime import timedelta


from amber import worker as worker_module
from amber.store.custom_models import ExampleRow
from amber.store.repo import Store
from tests.store.old_files import before_migrations

FRESH = timedelta(hours=1)
alive = lambda worker: True


def custom_model(store, account: int, name: str = "m"):
    d = store.datasets.create(account, f"d-{name}", "f.jsonl", 1, "prompt_completion",
                              [ExampleRow(1, "train", "p", "c")], {})
    return store.custom_models.create(account, name, "tiny", "tiny", d, 0.1, 1, {})


def test_racing_workers_each_get_distinct_jobs(store, url):
    alice = store.ensure_account("alice").id
    made = {store.jobs.create(alice, "generate", {"n": i}).id for i in range(40)}
    got: dict[str, list[int]] = {}

    def work(name: str) -> None:
        own = Store.open(url)  # a connection of its own, as another process would have
        try:
            got[name] = []
            while (job := own.jobs.claim(name, alive, FRESH)) is not None:
                got[name].append(job.id)
                assert own.jobs.complete(job.id, name, {"by": name})
        finally:
            own.close()

    threads = [threading.Thread(target=work, args=(f"host:{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [i for ids in got.values() for i in ids]
    assert sorted(claimed) == sorted(made)  # every job once, none twice
    assert all(j.status == "COMPLETED" and j.result == {"by": j.worker} for j in store.jobs.list(alice))


def test_a_dead_or_silent_workers_job_is_taken_over(store):
    alice = store.ensure_account("alice").id
    job = store.jobs.create(alice, "train", {"x": 1})
    first = store.jobs.claim("host:1", alive, FRESH)
    assert first.id == job.id and first.status == "RUNNING" and first.started_at is not None
    assert store.jobs.claim("host:2", alive, FRESH) is None                   # alive and beating
    assert store.jobs.claim("host:2", alive, timedelta(0)).worker == "host:2"  # silent: stale heartbeat
    assert not store.jobs.report_progress(job.id, "host:1", {"step": 1})       # no longer host:1's
    assert store.jobs.claim("host:3", lambda w: w != "host:2", FRESH).worker == "host:3"  # dead
    assert store.jobs.report_progress(job.id, "host:3", {"step": 2})
    assert store.jobs.get(alice, job.id).progress == {"step": 2}
    assert store.jobs.get(alice, job.id).started_at == first.started_at  # a takeover is no restart


def test_claim_takes_the_oldest_of_the_kinds_asked_for(store):
    alice = store.ensure_account("alice").id
    train, generate = store.jobs.create(alice, "train", {}), store.jobs.create(alice, "generate", {})
    assert store.jobs.claim("host:1", alive, FRESH, kinds=["generate"]).id == generate.id
    assert store.jobs.claim("host:2", alive, FRESH, kinds=["generate"]) is None
    assert store.jobs.claim("host:2", alive, FRESH).id == train.id


def test_cancel_stops_the_workers_reports_and_is_private(store):
    alice, bob = store.ensure_account("alice").id, store.ensure_account("bob").id
    queued, running = store.jobs.create(alice, "generate", {}), store.jobs.create(alice, "generate", {})
    assert store.jobs.cancel(alice, queued.id).status == "CANCELLED"
    assert store.jobs.claim("host:1", alive, FRESH).id == running.id  # the cancelled one is skipped
    assert store.jobs.cancel(bob, running.id) is None and store.jobs.get(bob, running.id) is None
    cancelled = store.jobs.cancel(alice, running.id)
    assert (cancelled.status, cancelled.failure) == ("CANCELLED", "cancelled") and cancelled.finished_at
    assert not store.jobs.report_progress(running.id, "host:1", {"step": 3})
    assert not store.jobs.complete(running.id, "host:1", {})
    assert not store.jobs.fail(running.id, "host:1", "late")
    assert store.jobs.get(alice, running.id).status == "CANCELLED"
    done = store.jobs.create(alice, "generate", {})
    store.jobs.claim("host:1", alive, FRESH)
    assert store.jobs.complete(done.id, "host:1", {"rows": 3})
    assert store.jobs.cancel(alice, done.id).status == "COMPLETED"  # finished: unchanged
    assert [j.id for j in store.jobs.list(alice, kind="generate")] == [queued.id, running.id, done.id]
    assert store.jobs.list(alice, kind="train") == [] and store.jobs.list(bob) == []


def test_a_custom_model_reads_its_status_from_its_train_job(store):
    alice = store.ensure_account("alice").id
    model = custom_model(store, alice)
    job = store.jobs.get(alice, model.job_id)
    assert (model.status, job.kind, job.spec, job.status) == ("QUEUED", "train", {"custom_model_id": model.id}, "QUEUED")
    store.jobs.claim("host:1", alive, FRESH)
    assert store.jobs.report_progress(job.id, "host:1", {"phase": "training"})
    got = store.custom_models.get(alice, model.id)
    assert (got.status, got.progress) == ("TRAINING", {"phase": "training"})
    assert store.custom_models.report_epoch(model.id, job.id, "host:1", [{"epoch": 1}])
    assert not store.custom_models.report_epoch(model.id, job.id, "host:2", [{"epoch": 9}])  # not host:2's
    store.jobs.cancel(alice, job.id)
    got = store.custom_models.get(alice, model.id)
    assert (got.status, got.failure, got.current_epoch) == ("FAILED", "cancelled", 1)
    assert not store.custom_models.complete(model.id, job.id, "host:1", 1, None, 10)
    assert store.custom_models.get(alice, model.id).default_epoch is None


def test_completing_a_custom_model_completes_its_job(store):
    alice = store.ensure_account("alice").id
    model = custom_model(store, alice)
    store.jobs.claim("host:1", alive, FRESH)
    assert store.custom_models.complete(model.id, model.job_id, "host:1", 1, {"examples": 0}, 10)
    got = store.custom_models.get(alice, model.id)
    assert (got.status, got.default_epoch, got.size_bytes, got.progress) == ("COMPLETED", 1, 10, None)
    assert store.jobs.get(alice, model.job_id).result == {"custom_model_id": model.id, "default_epoch": 1}


def test_deleting_a_custom_model_cancels_its_job(store):
    alice = store.ensure_account("alice").id
    model = custom_model(store, alice)
    store.jobs.claim("host:1", alive, FRESH)
    assert store.custom_models.delete(alice, model.id)
    job = store.jobs.get(alice, model.job_id)
    assert (job.status, job.failure) == ("CANCELLED", "custom model deleted")
    assert not store.jobs.report_progress(job.id, "host:1", {})


class FakeWorker(worker_module.Worker):
    """A worker without torch or a core share: only `run_job`'s dispatch is used."""
    def __init__(self, store):
        self.store, self.name, self.stale_after = store, "host:1", worker_module.STALE_AFTER


def test_a_job_of_a_kind_no_runner_knows_fails_cleanly(store):
    alice = store.ensure_account("alice").id
    job = store.jobs.create(alice, "mystery", {})
    worker = FakeWorker(store)
    worker.run_job(store.jobs.claim(worker.name, alive, FRESH))
    failed = store.jobs.get(alice, job.id)
    assert failed.status == "FAILED" and "'mystery'" in failed.failure and "train" in failed.failure


def test_a_registered_runner_runs_its_kind_and_an_error_fails_the_job(store, monkeypatch):
    alice = store.ensure_account("alice").id
    monkeypatch.setattr(worker_module, "RUNNERS", dict(worker_module.RUNNERS))

    def echo(worker, job) -> None:
        if job.spec.get("broken"):
            raise ValueError("no model")
        worker.store.jobs.complete(job.id, worker.name, {"rows": job.spec["n"]})

    worker_module.register_runner("echo", echo)
    ok, broken = store.jobs.create(alice, "echo", {"n": 2}), store.jobs.create(alice, "echo", {"broken": 1})
    worker = FakeWorker(store)
    for _ in range(2):
        worker.run_job(store.jobs.claim(worker.name, alive, FRESH))
    assert store.jobs.get(alice, ok.id).result == {"rows": 2}
    failed = store.jobs.get(alice, broken.id)
    assert failed.status == "FAILED" and failed.failure == "echo failed: ValueError: no model"


def test_a_custom_model_from_before_jobs_gets_its_job_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'amber.db'}"  # SQLite only: such files were SQLite's
    store = Store.open(url)
    alice = store.ensure_account("alice").id
    before_migrations(tmp_path / "amber.db")
    with sqlite3.connect(tmp_path / "amber.db") as db:  # as an older Amber left it, mid-training
        db.execute("INSERT INTO custom_models (id, account_id, name, base_model, model_type, dataset_id, "
                   "dataset_name, status, learning_rate, num_epochs, settings, epochs, worker, heartbeat_at, "
                   "progress, created_at) VALUES (7, ?, 'old', 'tiny', 'tiny', 1, 'd', 'TRAINING', 0.1, 2, '{}', "
                   "'[]', 'elsewhere:1', '2024-01-01 00:00:00', '{\"step\": 3}', '2024-01-01 00:00:00')", (alice,))
    for _ in range(2):  # a second opening copies nothing
        again = Store.open(url)
        model = again.custom_models.get(alice, 7)
        again.close()
    assert (model.status, model.progress) == ("TRAINING", {"step": 3})
    [job] = store.jobs.list(alice)
    assert (job.id, job.status, job.worker, job.spec) == (model.job_id, "RUNNING", "elsewhere:1", {"custom_model_id": 7})
    assert store.jobs.claim("host:1", alive, FRESH).id == job.id  # silent since 2024: taken over
    store.close()
