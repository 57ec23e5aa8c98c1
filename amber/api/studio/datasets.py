"""Datasets: `POST/GET /studio/v1/dataset`, `GET/DELETE /studio/v1/dataset/{id}`.

Translates the multipart form into `save_dataset`'s arguments (the rules live in
`amber/datasets/parse.py`, the keeping in `amber/datasets/store.py`) and errors into 422s.
"""
from __future__ import annotations

import math
import shutil

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool

from amber.api.deps import Account, Pool, Store
from amber.api.errors import invalid, not_found
from amber.datasets.parse import DatasetError
from amber.datasets.store import save_dataset
from amber.store.custom_models import DatasetInfo, NameTaken

router = APIRouter(prefix="/studio/v1")
MAX_UPLOAD_BYTES = 64 * 1024 * 1024


def dataset_json(d: DatasetInfo) -> dict:
    """AI21's dataset object (the SDK's DatasetResponse), plus what parsing did (`report`)."""
    return {"id": str(d.id), "datasetName": d.name, "sizeBytes": d.size_bytes,
            "creationDate": d.created_at.isoformat(), "numExamples": d.num_examples,
            "trainNumExamples": d.train_examples, "validationNumExamples": d.validation_examples,
            "numModelsUsed": d.num_models_used, "format": d.format, "fileName": d.file_name,
            "report": d.report}


def _flag(name: str, value: str | None) -> bool:
    """A form boolean; the SDK sends unset fields as "" (absent: false)."""
    text = (value or "").strip().lower()
    if text in ("", "false", "0", "no", "none", "null"):
        return False
    if text in ("true", "1", "yes"):
        return True
    raise invalid(("body", name), f"{name} must be true or false, not {value!r}")


def _ratio(value: str | None) -> float:
    if value is None or not value.strip() or value.strip().lower() in ("none", "null"):
        return 0.1
    try:
        ratio = float(value)
    except ValueError:
        raise invalid(("body", "split_ratio"), f"split_ratio must be a number, not {value!r}") from None
    if not math.isfinite(ratio):
        raise invalid(("body", "split_ratio"), "split_ratio must be a finite number")
    return ratio


@router.post("/dataset")  # 200, not 201: the SDK treats any other code as an error
async def create_dataset(account: Account, pool: Pool, store: Store,
                         dataset_file: UploadFile = File(...), dataset_name: str = Form(...),
                         selected_columns: str | None = Form(None),
                         approve_whitespace_correction: str | None = Form(None),
                         delete_long_rows: str | None = Form(None), split_ratio: str | None = Form(None)) -> dict:
    name = dataset_name.strip()
    if not name or len(name) > 128:
        raise invalid(("body", "dataset_name"), "dataset_name must be 1-128 characters")
    data = await dataset_file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"dataset_file is over {MAX_UPLOAD_BYTES // 2**20} MiB")
    loaded = await run_in_threadpool(pool.get, pool.registry.default)  # its tokenizer sets the length limit
    try:
        info = await run_in_threadpool(
            save_dataset, store, pool.config, account.id, name, dataset_file.filename or "dataset", data,
            loaded.tokenizer, loaded.spec.max_context - 1, selected_columns=selected_columns or None,
            approve_whitespace_correction=_flag("approve_whitespace_correction", approve_whitespace_correction),
            delete_long_rows=_flag("delete_long_rows", delete_long_rows), split_ratio=_ratio(split_ratio))
    except DatasetError as exc:
        raise invalid(("body", exc.field), str(exc)) from exc
    except NameTaken as exc:
        raise invalid(("body", "dataset_name"), str(exc)) from exc
    except OSError as exc:
        raise HTTPException(500, f"could not store the dataset: {exc}") from exc
    return dataset_json(info)


@router.get("/dataset")
async def list_datasets(account: Account, store: Store) -> list[dict]:
    return [dataset_json(d) for d in store.datasets.list(account.id)]


def _id(dataset_id: str) -> int:
    if not dataset_id.isdigit():
        raise not_found(f"dataset {dataset_id!r} does not exist")
    return int(dataset_id)


@router.get("/dataset/{dataset_id}")
async def get_dataset(dataset_id: str, account: Account, store: Store) -> dict:
    info = store.datasets.get(account.id, _id(dataset_id))
    if info is None:
        raise not_found(f"dataset {dataset_id!r} does not exist")
    return dataset_json(info)


@router.delete("/dataset/{dataset_id}")
async def delete_dataset(dataset_id: str, account: Account, pool: Pool, store: Store) -> dict:
    """Deletes the rows and the file. Custom models trained on it keep working (their adapters do
    not need it); one still waiting to train would fail, so that is refused."""
    ident = _id(dataset_id)
    if store.datasets.get(account.id, ident) is None:
        raise not_found(f"dataset {dataset_id!r} does not exist")
    pending = [m.name for m in store.custom_models.list(account.id)
               if m.dataset_id == ident and m.status in ("QUEUED", "TRAINING")]
    if pending:
        raise HTTPException(409, f"dataset {dataset_id} is in use by custom models still training: {pending}")
    store.datasets.delete(account.id, ident)
    shutil.rmtree(pool.config.dataset_dir(ident), ignore_errors=True)
    return {"id": dataset_id, "deleted": True}
