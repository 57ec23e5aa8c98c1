"""Custom model name -> the base model's engine and the adapter to apply: one place for every API
(AI21 complete now; chat and OpenAI routes too). Another account's model is simply not found."""
from __future__ import annotations

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool

from amber.api.errors import invalid, not_found
from amber.config import Config
from amber.engine.types import AdapterRef
from amber.serving import LoadedModel, ModelPool
from amber.store.custom_models import COMPLETED, CustomModelInfo
from amber.store.repo import AccountInfo, Store


def adapter_for(pool: ModelPool, model: CustomModelInfo, epoch: int | None) -> AdapterRef:
    """The adapter of `epoch` (default: the model's defaultEpoch). Epochs already finished can be
    used while later ones are still training."""
    done = model.current_epoch or 0
    if epoch is None:
        if model.status != COMPLETED:
            detail = f"custom model {model.name!r} is {model.status}"
            if model.status == "FAILED":
                raise HTTPException(409, f"{detail}: {model.failure}")
            raise HTTPException(409, f"{detail} ({done} of {model.num_epochs} epochs done); ask again when "
                                     f"it is COMPLETED, or pass an epoch that is done")
        epoch = model.default_epoch or model.num_epochs
    if not 1 <= epoch <= model.num_epochs:
        raise invalid(("body", "epoch"), f"epoch must be between 1 and {model.num_epochs} for {model.name!r}")
    if epoch > done:
        raise HTTPException(409, f"epoch {epoch} of {model.name!r} is not trained yet ({done} done)")
    return adapter_ref(pool.config, model, epoch)


def adapter_ref(config: Config, model: CustomModelInfo, epoch: int) -> AdapterRef:
    """The adapter of a trained `epoch`; the key tells apart a deleted model and a new one that
    reuses its id."""
    key = f"custom-{model.id}-{model.created_at.timestamp()}-epoch-{epoch}"
    return AdapterRef(key, str(config.adapter_dir(model.id, epoch)))


async def resolve_custom(pool: ModelPool, store: Store, account: AccountInfo, base: str | None, name: str,
                         epoch: int | None) -> tuple[LoadedModel, AdapterRef, CustomModelInfo]:
    """The running base model, adapter and record of the account's custom model `name` (or id).
    `base`, when given (the AI21 path names it), must be the base it was trained on."""
    model = store.custom_models.find(account.id, name)
    if model is None:
        raise not_found(f"custom model {name!r} does not exist (GET /studio/v1/custom-model lists yours)")
    spec = pool.registry.resolve(model.base_model)
    if base is not None and pool.registry.resolve(base) is not spec:
        raise not_found(f"custom model {name!r} is not trained on {base!r} (its base is {model.model_type!r})")
    if spec is None:
        raise HTTPException(409, f"custom model {name!r}'s base model {model.base_model!r} is no longer "
                                 "in this server's registry")
    adapter = adapter_for(pool, model, epoch)
    return await run_in_threadpool(pool.get, spec.name), adapter, model
