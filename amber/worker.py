"""`amber worker`: the process that runs jobs. Never runs inside the API process.

Loops: claim the oldest queued job of any kind (or one whose worker died: a dead pid on this host,
or no heartbeat for `stale_after`, wherever it ran) and hand it to the runner registered for its
kind (`RUNNERS`); a kind with no runner fails at once, saying so. Workers on several hosts share
one queue through the database (AMBER_DATABASE_URL) and the files (amber/files); while a job runs,
a thread beats its heartbeat every few seconds, whatever the job is doing (a long evaluation, a
slow step), so only a worker that is gone falls silent. The "train" runner trains a custom model's
LoRA adapter with `amber.training` into shared storage, resuming from the last complete epoch there
(whichever host wrote it), then scores it against k-shot prompting (`amber.evaluation`) and marks
the job COMPLETED, or FAILED with a reason the user can act on. Progress goes to the store about
once a second; a job cancelled or deleted meanwhile is noticed at the next report (`JobGone`) and
dropped.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable

from amber.config import Config, Registry
from amber.files import layout, open_storage
from amber.files.storage import fetch
from amber.store.custom_models import CustomModelInfo, worker_name
from amber.store.jobs import JobInfo
from amber.store.repo import Store
from amber.threads import CoreShare

log = logging.getLogger(__name__)
STALE_AFTER = timedelta(seconds=60)  # silence after which a job is taken over (`amber worker --stale-after`)
HEARTBEAT_EVERY_S = 5.0              # at most; a fifth of `stale_after` when that is shorter
REPORT_EVERY_S = 1.0
# Training is background work. What keeps both sides moving while a server on this AMBER_HOME is
# busy is the core split (amber/threads.py); nice 15 alone starved the trainer's OpenMP team (no
# step in 40 s, ~1 s alone), as it does behind any other busy program. A mild priority still lets
# the server's own threads (HTTP, a step begun before the split) go first.
NICENESS = 5


class JobGone(Exception):
    """The job was cancelled or deleted, or another worker took it over."""


class ParentGone(Exception):
    """The server that started this worker is gone: stop, leaving the job to be resumed."""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` on this host exists (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_alive(worker: str | None) -> bool:
    """Whether the worker `host:pid` still runs; a worker elsewhere is judged by its heartbeat."""
    if not worker:
        return False
    host, _, pid = worker.rpartition(":")
    return host != socket.gethostname() or not pid.isdigit() or pid_alive(int(pid))


class Worker:
    def __init__(self, config: Config, registry: Registry, store: Store, stale_after: timedelta = STALE_AFTER):
        self.config, self.registry, self.store, self.stale_after = config, registry, store, stale_after
        self.name = worker_name(os.getpid())
        self.storage = open_storage(config)
        self.parent: int | None = None  # with a parent to follow: its pid
        import torch
        self.cores = CoreShare(config.home, torch.get_num_threads())  # torch's default: every core

    def _parent_gone(self) -> bool:
        return self.parent is not None and not pid_alive(self.parent)

    def run(self, poll_seconds: float = 1.0, once: bool = False, parent: int | None = None) -> None:
        """`parent`: the pid of the server that started this worker; stop when it is gone (a
        killed server leaves no worker behind). Passed in rather than read here, since the server
        may die before this process gets that far."""
        log.info("worker %s waiting for training jobs (kinds: %s)", self.name, ", ".join(sorted(RUNNERS)))
        os.nice(NICENESS)
        self.parent = parent
        while not self._parent_gone():
            job = self.store.jobs.claim(self.name, is_alive, self.stale_after)
            if job is not None:
                try:
                    self.run_job(job)
                except ParentGone:
                    log.info("server gone; job %d (%s) will be resumed", job.id, job.kind)
                    return
            elif once:
                return
            else:
                time.sleep(poll_seconds)

    def run_job(self, job: JobInfo) -> None:
        """Run a claimed job with its kind's runner; a runner ends it (complete or fail) itself."""
        runner = RUNNERS.get(job.kind)
        if runner is None:
            self.store.jobs.fail(job.id, self.name, f"no runner for jobs of kind {job.kind!r} in this worker "
                                                    f"(it runs {', '.join(sorted(RUNNERS))})")
            return
        try:
            with self._heartbeat(job.id):
                runner(self, job)
        except ParentGone:
            raise
        except JobGone:
            log.info("job %d (%s) was cancelled, deleted or taken over; dropped", job.id, job.kind)
        except Exception as exc:
            log.exception("job %d (%s) failed", job.id, job.kind)
            doing = "training" if job.kind == "train" else job.kind
            self.store.jobs.fail(job.id, self.name, f"{doing} failed: {type(exc).__name__}: {exc}")

    @contextmanager
    def _heartbeat(self, job_id: int):
        """Beat job `job_id`'s heartbeat from a thread of its own meanwhile; it stops when the job is
        no longer this worker's (the runner finds out at its next report)."""
        done = threading.Event()
        every = min(HEARTBEAT_EVERY_S, self.stale_after.total_seconds() / 5)

        def beat() -> None:
            while not done.wait(every):
                try:
                    if not self.store.jobs.heartbeat(job_id, self.name):
                        return
                except Exception:  # a database hiccup: the next beat tries again
                    log.warning("heartbeat of job %d failed", job_id, exc_info=True)

        thread = threading.Thread(target=beat, name=f"amber-heartbeat-{job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _train_and_evaluate(self, model: CustomModelInfo, job_id: int) -> None:
        from amber.engine.checkpoint import ensure_checkpoint
        from amber.training.data import TrainingError
        from amber.training.lora import TrainConfig, train_lora

        spec = self.registry.resolve(model.base_model)
        if spec is None:
            raise TrainingError(f"base model {model.base_model!r} is not in this server's registry")
        rows = self.store.datasets.rows(model.dataset_id)
        if not rows:
            raise TrainingError(f"dataset {model.dataset_name!r} (id {model.dataset_id}) was deleted before "
                                "training finished; upload it again and create a new custom model")
        train = [_example(r) for r in rows if r.split == "train"]
        held_out = [_example(r) for r in rows if r.split == "validation"]
        checkpoint = ensure_checkpoint(spec, self.config.checkpoints_dir)
        settings = TrainConfig(learning_rate=model.learning_rate, epochs=model.num_epochs)
        epochs = [e for e in model.epochs]
        last_report = 0.0

        def on_progress(p) -> None:
            nonlocal last_report
            _use_threads(self.cores.between_steps())  # for the next step, perhaps after a pause
            if self._parent_gone():
                raise ParentGone()
            if time.monotonic() - last_report < REPORT_EVERY_S and p.step < p.total_steps:
                return
            last_report = time.monotonic()
            progress = {"phase": "training", "epoch": p.epoch, "epochs": p.epochs, "step": p.step,
                        "totalSteps": p.total_steps, "loss": p.loss, "etaSeconds": round(p.eta_seconds, 1)}
            if not self.store.jobs.report_progress(job_id, self.name, progress):
                raise JobGone()

        def on_epoch(result) -> None:
            epochs[:] = [e for e in epochs if e["epoch"] < result.epoch] + [_epoch_json(result)]
            if not self.store.custom_models.report_epoch(model.id, job_id, self.name, epochs):
                raise JobGone()

        _use_threads(self.cores.between_steps())
        started = time.perf_counter()
        run = self.storage.within(layout.custom_model(model.id))
        results = train_lora(checkpoint, train, held_out, settings, run, on_progress=on_progress, on_epoch=on_epoch)
        train_seconds = time.perf_counter() - started
        # from storage, which is never behind the store (an epoch is saved before it is reported)
        if not self.store.custom_models.report_epoch(model.id, job_id, self.name, [_epoch_json(r) for r in results]):
            raise JobGone()
        with_loss = [r for r in results if r.validation_loss is not None]
        best = min(with_loss, key=lambda r: r.validation_loss) if with_loss else results[-1]
        evaluation = None
        if held_out:
            if not self.store.jobs.report_progress(job_id, self.name, {"phase": "evaluating"}):
                raise JobGone()
            evaluation = self._evaluate(model, spec, checkpoint, best.epoch, train, held_out)
        evaluation = {**(evaluation or {}), "trainingSeconds": round(train_seconds, 2)}
        size = sum(size for name, size in run.list(best.key).items() if name.startswith("adapter_model."))
        if not self.store.custom_models.complete(model.id, job_id, self.name, best.epoch, evaluation, size):
            raise JobGone()
        log.info("custom model %s completed: epoch %d chosen", model.name, best.epoch)

    def engine(self, spec, checkpoint, max_batch: int):
        """The registry model `spec` as served (its precision, this machine's kernels), in an engine
        for this thread (`run_until_idle`) that shares the cores as training does."""
        from amber.engine.engine import Engine
        from amber.engine.loader import load_model
        from amber.engine.tokenizer import Tokenizer

        model = load_model(checkpoint, spec.dtype, kernel_cache=self.config.kernels_dir)
        return Engine(model, Tokenizer.from_pretrained(checkpoint), max_batch=max_batch,
                      max_context=spec.max_context, threads=self.cores.between_steps)

    def _evaluate(self, custom, spec, checkpoint, epoch, train, held_out) -> dict:
        """Through Amber's own engine, in the served precision, on this thread."""
        from amber.evaluation import Example, evaluate
        from amber.training.data import ExampleEncoder

        encoder = ExampleEncoder(checkpoint)
        rendered = lambda rows: [Example(*encoder.render_chat(r.messages)) if r.messages
                                 else Example(r.prompt, r.completion) for r in rows]
        engine = self.engine(spec, checkpoint, max_batch=1)
        with self.local_adapter(layout.adapter(custom.id, epoch)) as adapter:
            return {"epoch": epoch, **evaluate(engine, adapter, rendered(train), rendered(held_out))}

    @contextmanager
    def local_adapter(self, key: str):
        """The adapter in storage directory `key`, in a local directory for this job's engine (which
        reads a directory), removed afterwards. FileNotFoundError when storage has none."""
        from amber.engine.types import AdapterRef

        with tempfile.TemporaryDirectory(prefix="amber-adapter-") as local:
            fetch(self.storage, key, Path(local), layout.ADAPTER_FILES)
            yield AdapterRef(f"{key}@job", local)


def train(worker: Worker, job: JobInfo) -> None:
    """The "train" runner: the custom model `job.spec["custom_model_id"]`."""
    from amber.training.data import TrainingError

    model_id = job.spec["custom_model_id"]
    model = worker.store.custom_models.get_any(model_id)
    if model is None:
        worker.store.jobs.fail(job.id, worker.name, f"custom model {model_id} no longer exists")
        return
    log.info("training custom model %s (id %d, job %d) on %s", model.name, model.id, job.id, model.base_model)
    try:
        with worker.cores.training():  # a server on this AMBER_HOME leaves us cores meanwhile
            worker._train_and_evaluate(model, job.id)
    except JobGone:
        if worker.store.custom_models.get_any(model_id) is None:  # deleted: its adapters go too
            worker.storage.delete(layout.custom_model(model_id))
        raise
    except TrainingError as exc:
        worker.store.jobs.fail(job.id, worker.name, str(exc))


# What the worker runs, by job kind. Another module adds its kind with `register_runner` before the
# worker starts (the "generate" kind, say); a runner ends its job itself (complete or fail), raises
# JobGone when a report is refused, and leaves any other exception to fail the job.
def generate(worker: Worker, job: JobInfo) -> None:
    """A generation job (amber/datagen/job.py)."""
    from amber.datagen.job import run
    run(worker, job)


RUNNERS: dict[str, Callable[[Worker, JobInfo], None]] = {"train": train, "generate": generate}


def register_runner(kind: str, runner: Callable[[Worker, JobInfo], None]) -> None:
    assert kind not in RUNNERS or RUNNERS[kind] is runner, f"a runner for {kind!r} is already registered"
    RUNNERS[kind] = runner


def _use_threads(count: int) -> None:
    """Set this thread's torch intra-op threads (`amber.threads` says how many)."""
    import torch
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def _epoch_json(result) -> dict:
    return {"epoch": result.epoch, "train_loss": result.train_loss,
            "validation_loss": result.validation_loss, "seconds": round(result.seconds, 2)}


def _example(row):
    from amber.training.data import Example
    return Example(row.prompt, row.completion, tuple(row.messages) if row.messages else None)


class WorkerProcess:
    """`amber serve`'s training worker: a child process, started again whenever it dies (a worker
    killed mid-job is replaced, and the new one resumes the job from its last epoch)."""

    def __init__(self, log_level: str = "info", stale_after: float = STALE_AFTER.total_seconds()):
        self.command = [sys.executable, "-m", "amber.cli", "worker", "--parent", str(os.getpid()),
                        "--stale-after", str(stale_after), "--log-level", log_level]
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._watch = threading.Thread(target=self._keep_alive, name="amber-worker-watch", daemon=True)

    def start(self) -> WorkerProcess:
        self.process = subprocess.Popen(self.command)
        self._watch.start()
        return self

    def _keep_alive(self) -> None:
        while not self._stopping.wait(1.0):
            if self.process.poll() is not None:
                log.warning("training worker exited with %s; starting another", self.process.returncode)
                self.process = subprocess.Popen(self.command)

    def stop(self) -> None:
        self._stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
