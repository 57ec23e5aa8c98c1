"""Custom models: `POST/GET /studio/v1/custom-model`, `GET/PUT/DELETE /studio/v1/custom-model/{id}`.

Creating one queues a training job in the store; `amber worker` (a separate process) trains it.
"""
from __future__ import annotations

import re

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator

from amber.api import docs
from amber.api.custom import forget_deleted
from amber.api.deps import Account, Files, Pool, Store
from amber.api.routing import TextRoute
from amber.api.errors import invalid, not_found
from amber.files import layout
from amber.store.custom_models import CustomModelInfo, NameTaken
from amber.training.defaults import DEFAULT_EPOCHS, DEFAULT_LEARNING_RATE, MAX_EPOCHS

router = APIRouter(prefix="/studio/v1", route_class=TextRoute, responses=docs.ai21(401))
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CreateCustomModel(BaseModel):
    """snake_case, as AI21 (and its SDK) send it; unset optional fields arrive as null."""
    model_config = ConfigDict(extra="forbid")
    dataset_id: str | int
    model_name: str
    model_type: str
    learning_rate: float | None = Field(None, gt=0, le=1)
    num_epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS)

    @field_validator("model_name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("model_name must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit (it becomes part of a URL)")
        return value


class UpdateCustomModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    defaultEpoch: int


def _size(size_bytes: int | None) -> str | None:
    return None if size_bytes is None else f"{size_bytes / 2**20:.1f}MB"


def custom_model_json(m: CustomModelInfo) -> dict:
    """AI21's custom-model object (the SDK's CustomBaseModelResponse: datasetId an integer,
    customModelType and currentEpoch present even when null), plus training detail and whether
    the dataset it was trained on has since been deleted (`datasetDeleted`). `status`, `progress`
    and `failure` come from its training job (`jobId`, at /studio/v1/jobs)."""
    chosen = next((e for e in m.epochs if e["epoch"] == m.default_epoch), None)
    return {
        "id": str(m.id), "name": m.name, "tier": "custom", "modelType": m.model_type,
        "baseModel": m.base_model, "customModelType": "lora", "status": m.status,
        "modelMetadata": {"learningRate": m.learning_rate, "numEpochs": m.num_epochs,
                          "defaultEpoch": m.default_epoch or m.num_epochs, "cost": 0.0,
                          "validationLoss": chosen and chosen.get("validation_loss"),
                          "evalLoss": chosen and chosen.get("validation_loss"),
                          "trainLoss": chosen and chosen.get("train_loss")},
        "datasetId": m.dataset_id, "datasetName": m.dataset_name, "datasetDeleted": m.dataset_deleted,
        "creationDate": m.created_at.isoformat(), "currentEpoch": m.current_epoch, "size": _size(m.size_bytes),
        "progress": m.progress, "epochs": m.epochs, "evaluation": m.evaluation, "failure": m.failure,
        "settings": m.settings, "jobId": None if m.job_id is None else str(m.job_id),
    }


@router.post("/custom-model", responses=docs.ai21(400))  # 200: as for datasets
async def create_custom_model(body: CreateCustomModel, account: Account, pool: Pool, store: Store) -> dict:
    dataset_id = str(body.dataset_id)
    dataset = store.datasets.get(account.id, int(dataset_id)) if dataset_id.isdigit() else None
    if dataset is None:
        raise invalid(("body", "dataset_id"), f"dataset {dataset_id!r} does not exist "
                                              "(GET /studio/v1/dataset lists yours)")
    spec = pool.registry.resolve(body.model_type)
    if spec is None:
        names = sorted(n for s in pool.registry.models.values() for n in (s.name, *s.aliases))
        raise invalid(("body", "model_type"), f"model_type {body.model_type!r} is not a model on this "
                                              f"server; choose one of {names}")
    if pool.registry.resolve(body.model_name) is not None:
        raise invalid(("body", "model_name"), f"{body.model_name!r} is a general model's name")
    try:
        model = store.custom_models.create(
            account.id, body.model_name, spec.name, body.model_type, dataset,
            learning_rate=body.learning_rate or DEFAULT_LEARNING_RATE,
            num_epochs=body.num_epochs or DEFAULT_EPOCHS, settings={})
    except NameTaken as exc:
        raise invalid(("body", "model_name"), str(exc)) from exc
    return custom_model_json(model)


@router.get("/custom-model")
async def list_custom_models(account: Account, store: Store) -> list[dict]:
    return [custom_model_json(m) for m in store.custom_models.list(account.id)]


def owned_model(store, account, model_id: str) -> CustomModelInfo:
    model = store.custom_models.get(account.id, int(model_id)) if model_id.isdigit() else None
    if model is None:
        raise not_found(f"custom model {model_id!r} does not exist")
    return model


@router.get("/custom-model/{model_id}", responses=docs.ai21(404))
async def get_custom_model(model_id: str, account: Account, store: Store) -> dict:
    return custom_model_json(owned_model(store, account, model_id))


@router.put("/custom-model/{model_id}", responses=docs.ai21(400, 404))
async def update_custom_model(model_id: str, body: UpdateCustomModel, account: Account, store: Store) -> dict:
    model = owned_model(store, account, model_id)
    done = model.current_epoch or 0
    if not 1 <= body.defaultEpoch <= done:
        raise invalid(("body", "defaultEpoch"), f"defaultEpoch must be a trained epoch, 1..{done}"
                      if done else "no epoch is trained yet")
    return custom_model_json(store.custom_models.set_default_epoch(account.id, model.id, body.defaultEpoch))


@router.delete("/custom-model/{model_id}", responses=docs.ai21(404))
async def delete_custom_model(model_id: str, account: Account, pool: Pool, store: Store, files: Files) -> dict:
    """Deletes the record and its adapters (in shared storage, and this replica's copies at once;
    other replicas notice within seconds) and cancels its training job; a worker training it stops
    at its next report."""
    model = owned_model(store, account, model_id)
    store.custom_models.delete(account.id, model.id)
    await run_in_threadpool(files.storage.delete, layout.custom_model(model.id))
    await run_in_threadpool(forget_deleted, pool, files)
    return {"id": model_id, "deleted": True}
