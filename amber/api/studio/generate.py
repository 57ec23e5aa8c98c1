"""Data generation: `POST /studio/v1/dataset/generate` queues a generation job for the worker; the
job's rows are reviewed (`GET .../{job}/rows`, `PATCH .../{job}/rows/{index}`) and saved as a
dataset (`POST .../{job}/save`), which `custom-model` then trains on like any upload.

Every check that can fail is made here, before a job exists: the mode, the examples, N and the
inputs against their caps, the model (a general one, or the account's custom model with a trained
epoch) and whether k examples fit its context. Wire format only: the generating is amber/datagen's,
the rows' keeping amber/store/generated.py's.
"""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from amber.api import docs
from amber.api.custom import trained_epoch
from amber.api.deps import Account, Pool, Store
from amber.api.errors import invalid, not_found
from amber.api.routing import TextRoute
from amber.api.studio import jobs
from amber.api.studio.datasets import dataset_json
from amber.datagen.generate import MAX_ROWS, MAX_SAMPLES, GenerationSpec, SpecError, build_spec, check_fits
from amber.datagen.job import KIND, save_rows, spec_json
from amber.datasets.parse import DatasetError
from amber.evaluation import Example
from amber.files import layout
from amber.store.custom_models import NameTaken
from amber.store.generated import APPROVED, REJECTED, VIEWS

router = APIRouter(prefix="/studio/v1", route_class=TextRoute, responses=docs.ai21(401))
MAX_SHOTS = 64
Text = Annotated[str, StringConstraints(min_length=1, max_length=20_000)]


class Seed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text
    completion: Text


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["inputs", "examples"]
    model: str
    epoch: int | None = Field(None, ge=1, description="a custom model's epoch (default: its defaultEpoch)")
    examples: list[Seed] = Field(..., min_length=1, max_length=MAX_SHOTS)
    inputs: list[Annotated[str, StringConstraints(max_length=20_000)]] | None = Field(None, max_length=MAX_ROWS)
    n: int | None = Field(None, ge=1, le=MAX_ROWS, description=f"examples mode: rows to write (at most {MAX_ROWS})")
    shots: int | None = Field(None, ge=1, le=MAX_SHOTS, description="examples per prompt (default: all, at most 8)")
    samples: int = Field(1, ge=1, le=MAX_SAMPLES, description="inputs mode: outputs drawn per input; the majority is kept")
    temperature: float | None = Field(None, ge=0, le=5, allow_inf_nan=False)
    topP: float = Field(1.0, ge=0, le=1, allow_inf_nan=False)
    maxTokens: int = Field(32, ge=1, le=512)
    separator: str | None = Field(None, max_length=200)
    stopSequences: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] | None = Field(None, max_length=16)
    seed: int = Field(0, ge=0, lt=2**31)


def _spec(body: GenerateRequest) -> GenerationSpec:
    try:
        return build_spec(body.mode, [Example(e.prompt, e.completion) for e in body.examples], inputs=body.inputs,
                          n=body.n, shots=body.shots, samples=body.samples, temperature=body.temperature,
                          top_p=body.topP, max_tokens=body.maxTokens, separator=body.separator,
                          stop=body.stopSequences, seed=body.seed)
    except SpecError as exc:
        raise invalid(("body", exc.field), str(exc)) from exc


async def _model(body: GenerateRequest, account, pool, store) -> tuple[str, str, dict | None]:
    """(name as asked, registry model, adapter {key: its directory in shared storage} or None)."""
    spec = pool.registry.resolve(body.model)
    if spec is not None:
        return body.model, spec.name, None
    custom = store.custom_models.find(account.id, body.model)
    if custom is None:
        names = sorted(n for s in pool.registry.models.values() for n in (s.name, *s.aliases))
        raise invalid(("body", "model"), f"model {body.model!r} is neither a general model ({names}) nor one "
                                         "of your custom models")
    try:
        epoch = trained_epoch(custom, body.epoch)
    except HTTPException as exc:
        raise invalid(("body", "model"), f"custom model {body.model!r} cannot generate yet: {exc.detail}") from exc
    return body.model, custom.base_model, {"key": layout.adapter(custom.id, epoch)}


def job_json(job, counts: dict[str, int] | None = None) -> dict:
    """The job as /studio/v1/jobs shows it, with what it generates and its rows by view."""
    return {**jobs.job_json(job), "model": job.spec.get("model"), "mode": job.spec["generation"]["mode"],
            "rows": counts}


@router.post("/dataset/generate", responses=docs.ai21(400, 422))
async def create_generation(body: GenerateRequest, account: Account, pool: Pool, store: Store) -> dict:
    """Queue a generation job; its progress is at GET /studio/v1/dataset/generate/{id}."""
    spec = _spec(body)
    name, base, adapter = await _model(body, account, pool, store)
    loaded = await run_in_threadpool(pool.get, base)
    try:
        await run_in_threadpool(check_fits, spec, loaded.tokenizer.encode, loaded.spec.max_context)
    except SpecError as exc:
        raise invalid(("body", exc.field), str(exc)) from exc
    job = store.jobs.create(account.id, KIND, spec_json(spec, name, base, adapter))
    return job_json(job, store.generated.counts(job.id))


def _job(store, account, job_id: str):
    job = store.jobs.get(account.id, int(job_id)) if job_id.isdigit() else None
    if job is None or job.kind != KIND:
        raise not_found(f"generation job {job_id!r} does not exist")
    return job


@router.get("/dataset/generate", include_in_schema=True)
async def list_generations(account: Account, store: Store) -> list[dict]:
    return [job_json(j) for j in store.jobs.list(account.id, KIND)]


@router.get("/dataset/generate/{job_id}", responses=docs.ai21(404))
async def get_generation(job_id: str, account: Account, store: Store) -> dict:
    job = _job(store, account, job_id)
    return job_json(job, store.generated.counts(job.id))


def row_json(r) -> dict:
    return {"index": r.index, "input": r.input, "output": r.output, "finishReason": r.finish_reason,
            "samples": r.samples, "confidence": r.confidence, "flags": r.reasons, "details": r.details,
            "decision": r.decision, "edited": r.edited, "included": r.included}


@router.get("/dataset/generate/{job_id}/rows", responses=docs.ai21(404, 422))
async def generated_rows(job_id: str, account: Account, store: Store, view: str = "all", offset: int = 0,
                         limit: int = 50) -> dict:
    """`view`: all | kept (no flag) | flagged | approved (what a save includes) | rejected."""
    job = _job(store, account, job_id)
    if view not in VIEWS:
        raise invalid(("query", "view"), f"view must be one of {list(VIEWS)}")
    if not 0 <= offset < 2**31 or not 1 <= limit <= 500:
        raise invalid(("query", "limit" if offset >= 0 else "offset"), "offset >= 0 and limit 1..500")
    rows, total = store.generated.page(job.id, view, offset, limit)
    return {"rows": [row_json(r) for r in rows], "total": total}


class Review(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Literal["approve", "reject", "reset"] | None = None
    input: Annotated[str, StringConstraints(min_length=1, max_length=20_000)] | None = None
    output: Annotated[str, StringConstraints(min_length=1, max_length=20_000)] | None = None


@router.patch("/dataset/generate/{job_id}/rows/{index}", responses=docs.ai21(404, 422))
async def review_row(job_id: str, index: int, body: Review, account: Account, store: Store) -> dict:
    """Approve, reject or reset (back to the filters' verdict) a row, and/or edit its text (an edit
    approves the row unless the same call rejects it)."""
    job = _job(store, account, job_id)
    if body.decision is None and body.input is None and body.output is None:
        raise invalid(("body", "decision"), "send a decision (approve, reject, reset), an input or an output")
    decision = {"approve": APPROVED, "reject": REJECTED}.get(body.decision or "")
    row = store.generated.review(job.id, index, decision=decision, clear=body.decision == "reset",
                                 input=body.input, output=body.output)
    if row is None:
        raise not_found(f"generation job {job_id} has no row {index}")
    return row_json(row)


class Save(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset_name: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    split_ratio: float = Field(0.1, ge=0, le=0.5)


@router.post("/dataset/generate/{job_id}/save", responses=docs.ai21(404, 409, 422))
async def save_generation(job_id: str, body: Save, account: Account, pool: Pool, store: Store) -> dict:
    """The approved rows (the reviewer's word, else the filters') as a new dataset, through the same
    checks as an upload; the job's rows stay for another review."""
    job = _job(store, account, job_id)
    if job.status not in ("COMPLETED", "CANCELLED"):
        raise HTTPException(409, f"generation job {job_id} is {job.status}; save it once it has finished")
    rows = [r for r in store.generated.all(job.id) if r.included]
    if not rows:
        raise HTTPException(409, f"generation job {job_id} has no approved rows to save")
    loaded = await run_in_threadpool(pool.get, job.spec["baseModel"])
    try:
        dataset = await run_in_threadpool(save_rows, store, pool.config, account.id, job, rows, body.dataset_name,
                                          loaded.tokenizer, loaded.spec.max_context - 1, body.split_ratio)
    except DatasetError as exc:
        raise invalid(("body", exc.field), str(exc), exc.rows) from exc
    except NameTaken as exc:
        raise invalid(("body", "dataset_name"), str(exc)) from exc
    return dataset_json(dataset)
