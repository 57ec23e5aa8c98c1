"""The core split between serving and training (amber/threads.py) is in force: a real engine drops
to its share while a job holds the training lock and returns to every core after; a real worker
trains at its share while serving is busy and at every core once serving goes idle. Thread counts
only: speed lives in bench/train_under_load.py."""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from amber.config import Config, EngineConfig, ModelSpec, Registry
from amber.engine.types import GenerationRequest, SamplingParams
from amber.serving import ModelPool
from amber.threads import STEP_ASIDE_AFTER_S, CoreShare, engine_threads, training_threads

SST2 = Path(__file__).resolve().parent / "data/sst2/train.jsonl"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Setting threads on a thread also sets torch's default for threads created later."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_split_leaves_each_side_a_core():
    assert [training_threads(c) for c in (1, 2, 4, 8, 16)] == [1, 1, 1, 2, 4]
    assert [engine_threads(c) for c in (1, 2, 4, 8, 16)] == [1, 1, 3, 6, 12]


def test_the_lock_is_held_only_while_a_job_trains(tmp_path):
    serving, worker = CoreShare(tmp_path, 2), CoreShare(tmp_path, 2)
    assert not serving.is_training()
    with worker.training(), CoreShare(tmp_path, 2).training():  # two workers may train at once
        assert serving.is_training()
    assert not serving.is_training()


def test_beside_a_one_thread_engine_a_worker_steps_aside_with_the_lock_released(tmp_path):
    serving, worker = CoreShare(tmp_path, 2), CoreShare(tmp_path, 2)
    with worker.training():
        assert worker.between_steps() == 2               # serving idle: every core, no pause
        serving.engine_threads()                         # serving busy from here on
        time.sleep(STEP_ASIDE_AFTER_S)                   # a training step
        result = []
        step_aside = threading.Thread(target=lambda: result.append(worker.between_steps()))
        step_aside.start()
        released = False
        while step_aside.is_alive() and not released:
            released = not serving.is_training()
        step_aside.join()
        assert released and result == [1]                # one thread, after a pause without the lock
        assert serving.is_training()                     # computing again


def test_an_engine_gives_a_training_job_its_share_and_takes_it_back(tiny_checkpoint, tmp_path):
    config = Config(home=tmp_path, engine=EngineConfig(threads=4))
    pool = ModelPool(config, Registry("tiny", {"tiny": ModelSpec("tiny", path=str(tiny_checkpoint),
                                                                   max_context=256)}))
    engine = pool.get("tiny").engine

    def threads_of_a_step() -> int:
        seen, done = [], threading.Event()
        request = GenerationRequest(uuid.uuid4().hex, (5, 6, 7), SamplingParams(temperature=0, max_tokens=2))
        engine.submit(request, lambda _: (seen.append(torch.get_num_threads()), done.set()))  # engine thread
        assert done.wait(60)
        return seen[0]

    try:
        assert threads_of_a_step() == 4
        assert CoreShare(tmp_path, 4).serving_busy()  # the engine marked it so
        with CoreShare(tmp_path, 4).training():
            assert threads_of_a_step() == 3
        assert threads_of_a_step() == 4
    finally:
        pool.close()


def test_a_worker_trains_at_its_share_while_serving_is_busy(tiny_checkpoint, tmp_path, monkeypatch):
    import amber.training.lora as lora
    import amber.worker as worker_module
    from amber.store.custom_models import ExampleRow
    from amber.store.repo import Store

    store = Store.open(f"sqlite:///{tmp_path / 'amber.db'}")
    account = store.ensure_account("alice")
    rows = [json.loads(line) for line in SST2.read_text().splitlines()[:40]]
    examples = [ExampleRow(i, "train", r["prompt"], r["completion"]) for i, r in enumerate(rows)]
    dataset = store.datasets.create(account.id, "sst2", "sst2.jsonl", 1, "jsonl", examples, {})
    store.custom_models.create(account.id, "sentiment", "tiny", "tiny", dataset, 1e-3, 2, {})
    registry = Registry("tiny", {"tiny": ModelSpec("tiny", path=str(tiny_checkpoint), max_context=256)})
    worker = worker_module.Worker(Config(home=tmp_path), registry, store)
    worker.cores = CoreShare(tmp_path, 4)  # as on a 4-core machine, whatever this one has

    # a stand-in for a busy engine on the same AMBER_HOME: marks serving busy, watches the lock
    serving, stop, engine_counts = CoreShare(tmp_path, 4), threading.Event(), []
    def serve() -> None:
        while not stop.wait(0.02):
            engine_counts.append(serving.engine_threads())
    server = threading.Thread(target=serve)
    server.start()
    time.sleep(0.1)

    steps, real_nll = [], lora.completion_nll
    def recording_nll(llama, batch):
        steps.append((torch.get_num_threads(), serving.is_training()))
        if len(steps) == 3:  # serving goes idle: its mark goes stale
            stop.set()
            server.join()
            stale = time.time() - 60
            os.utime(tmp_path / "run" / "serving.busy", (stale, stale))
        return real_nll(llama, batch)
    monkeypatch.setattr(lora, "completion_nll", recording_nll)

    try:
        job = store.jobs.claim(worker.name, lambda _: False, worker_module.STALE_AFTER)
        worker.run_job(job)
    finally:
        stop.set()
        server.join()
    assert store.custom_models.get_any(job.spec["custom_model_id"]).status == "COMPLETED"
    assert [threads for threads, _ in steps[:3]] == [1, 1, 1]   # training steps beside busy serving
    assert {threads for threads, _ in steps[3:]} == {4}          # the rest: every core
    assert all(training for _, training in steps)
    assert 3 in engine_counts                                    # the engine's share meanwhile
    assert not serving.is_training()                             # released with the job
