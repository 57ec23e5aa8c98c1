"""The worker's runner for generation jobs (kind "generate"): load the model, write rows a chunk at a
time into the job's rows (store.generated), filter everything written so far after each chunk, and
report rows done, rows kept and an ETA as the job's progress. Cancelled (the report says the job is
no longer ours): stop after the chunk in hand. Killed: a new worker claims the job and goes on after
the last row written; rows live with the job, never in a dataset, until a reviewer saves them.
"""
from __future__ import annotations

import collections
import contextlib
import time

from amber.datagen.filters import Candidate, filter_rows
from amber.datagen.generate import GenerationSpec, Generated, generate

KIND = "generate"


def spec_json(generation: GenerationSpec, model: str, base_model: str, adapter: dict | None) -> dict:
    """A generation job's spec: what to generate, with which registry model and adapter."""
    return {"generation": generation.to_json(), "model": model, "baseModel": base_model, "adapter": adapter}


def save_rows(store, config, account_id: int, job, rows, name: str, tokenizer, max_tokens: int,
              split_ratio: float = 0.1):
    """`rows` (the job's approved rows) as a new dataset, through the same checks as an upload
    (DatasetError, NameTaken): a generated row is kept as a JSONL file like any other."""
    import io
    import json

    from amber.datasets.store import save_dataset

    data = "".join(json.dumps({"prompt": r.input, "completion": r.output}, ensure_ascii=False) + "\n" for r in rows)
    return save_dataset(store, config, account_id, name, f"generated-{job.id}.jsonl", io.BytesIO(data.encode()),
                        tokenizer, max_tokens, approve_whitespace_correction=True, delete_long_rows=True,
                        split_ratio=split_ratio)


def verdicts(store, job_id: int, spec: GenerationSpec) -> tuple[int, int, dict[str, int]]:
    """Filter every row the job has written; (rows, kept, rows per reason)."""
    rows = store.generated.all(job_id)
    found = filter_rows([Candidate(r.index, r.input, r.output, r.finish_reason, tuple(r.samples or ()))
                         for r in rows], [(s.prompt, s.completion) for s in spec.seeds], mode=spec.mode)
    store.generated.set_verdicts(job_id, found)
    reasons = collections.Counter(reason for v in found for reason in v.reasons)
    return len(found), sum(v.kept for v in found), dict(reasons)


def run(worker, job) -> None:
    """Registered with the worker for jobs of kind "generate"; raises JobGone when cancelled.
    Background work like training: it shares the cores with a server on this AMBER_HOME the same way."""
    with worker.cores.training():
        _run(worker, job)


def _run(worker, job) -> None:
    from amber.engine.checkpoint import ensure_checkpoint
    from amber.training.data import TrainingError

    spec = GenerationSpec.from_json(job.spec["generation"])
    model_spec = worker.registry.resolve(job.spec["baseModel"])
    if model_spec is None:
        raise TrainingError(f"model {job.spec['baseModel']!r} is not in this server's registry")
    adapter = job.spec.get("adapter")  # {"key": the adapter's directory in shared storage}
    checkpoint = ensure_checkpoint(model_spec, worker.config.checkpoints_dir)
    engine = worker.engine(model_spec, checkpoint, max_batch=16)
    with (worker.local_adapter(adapter["key"]) if adapter else contextlib.nullcontext()) as ref:
        _generate(worker, job, spec, engine, ref)


def _generate(worker, job, spec: GenerationSpec, engine, ref) -> None:
    from amber.worker import JobGone

    store, started = worker.store, time.perf_counter()
    start = store.generated.count(job.id)
    made_here = 0

    def on_rows(rows: list[Generated]) -> bool:
        nonlocal made_here
        store.generated.add(job.id, rows)
        made_here += len(rows)
        done, kept, _ = verdicts(store, job.id, spec)
        rate = made_here / max(time.perf_counter() - started, 1e-9)
        progress = {"phase": "generating", "rowsDone": done, "rowsTotal": spec.size, "rowsKept": kept,
                    "etaSeconds": round((spec.size - done) / rate, 1) if rate else None}
        return store.jobs.report_progress(job.id, worker.name, progress)

    if not store.jobs.report_progress(job.id, worker.name, {"phase": "generating", "rowsDone": start,
                                                             "rowsTotal": spec.size, "rowsKept": None,
                                                             "etaSeconds": None}):
        raise JobGone()
    done = generate(engine, spec, start, on_rows, ref)
    if done < spec.size:
        raise JobGone()  # cancelled: on_rows said stop
    seconds = time.perf_counter() - started
    rows, kept, reasons = verdicts(store, job.id, spec)
    result = {"generated": rows, "kept": kept, "yield": kept / rows if rows else 0.0, "reasons": reasons,
              "seconds": round(seconds, 2), "rowsPerMinute": round(60 * made_here / seconds, 1) if seconds else None}
    if not store.jobs.complete(job.id, worker.name, result):
        raise JobGone()
