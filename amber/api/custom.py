"""Custom model name -> the base model's engine and the adapter to apply: one place for every API
(AI21 complete now; chat and OpenAI routes too). Another account's model is simply not found.

Adapters live in shared storage; the engine reads this replica's local copy (amber/files/
adapter_cache.py), made on first use. A model deleted through any replica is noticed here: every
few seconds a request for a custom model sweeps the copies whose files are gone from storage, and
the engines forget them."""
from __future__ import annotations

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool

from amber.api.errors import invalid, not_found
from amber.api.offload import running_model
from amber.engine.types import AdapterRef
from amber.files import SharedFiles, layout
from amber.files.adapter_cache import engine_key
from amber.serving import LoadedModel, ModelPool
from amber.store.custom_models import COMPLETED, CustomModelInfo
from amber.store.repo import AccountInfo, Store


def trained_epoch(model: CustomModelInfo, epoch: int | None) -> int:
    """`epoch`, or the model's defaultEpoch, checked: epochs already finished can be used while
    later ones are still training."""
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
    return epoch


def adapter_version(model: CustomModelInfo) -> str:
    """Tells apart a deleted model's adapters and those of a new one under the same key."""
    return str(round(model.created_at.timestamp() * 1_000_000))


async def adapter_for(files: SharedFiles, model: CustomModelInfo, epoch: int | None) -> AdapterRef:
    """The adapter of `epoch` (default: the model's defaultEpoch), copied here from storage on first use."""
    return await run_in_threadpool(local_adapter, files, model, trained_epoch(model, epoch))


def local_adapter(files: SharedFiles, model: CustomModelInfo, epoch: int) -> AdapterRef:
    """Blocking: the first use of an adapter on this replica copies its files."""
    key, version = layout.adapter(model.id, epoch), adapter_version(model)
    try:
        path = files.adapters.local(key, version)
    except FileNotFoundError:
        raise HTTPException(409, f"epoch {epoch} of {model.name!r} has no adapter files in storage") from None
    return AdapterRef(engine_key(key, version), str(path))


async def notice_deletions(pool: ModelPool, files: SharedFiles) -> None:
    """Every SWEEP_EVERY_S at most: drop local copies of adapters deleted from storage, and the
    engines' resident copies of them."""
    if files.adapters.sweep_due():
        await run_in_threadpool(forget_deleted, pool, files)


def forget_deleted(pool: ModelPool, files: SharedFiles) -> None:
    dropped = files.adapters.sweep()
    engines = [pool.get(spec.name).engine for spec in pool.registry.models.values() if pool.is_loaded(spec.name)]
    for key, version in dropped:
        for engine in engines:
            engine.forget_adapter(engine_key(key, version))


async def resolve_custom(pool: ModelPool, store: Store, files: SharedFiles, account: AccountInfo, base: str | None,
                         name: str, epoch: int | None) -> tuple[LoadedModel, AdapterRef, CustomModelInfo]:
    """The running base model, adapter and record of the account's custom model `name` (or id).
    `base`, when given (the AI21 path names it), must be the base it was trained on."""
    await notice_deletions(pool, files)
    model = store.custom_models.find(account.id, name)
    if model is None:
        raise not_found(f"custom model {name!r} does not exist (GET /studio/v1/custom-model lists yours)")
    spec = pool.registry.resolve(model.base_model)
    if base is not None and pool.registry.resolve(base) is not spec:
        raise not_found(f"custom model {name!r} is not trained on {base!r} (its base is {model.model_type!r})")
    if spec is None:
        raise HTTPException(409, f"custom model {name!r}'s base model {model.base_model!r} is no longer "
                                 "in this server's registry")
    adapter = await adapter_for(files, model, epoch)
    return await running_model(pool, spec.name), adapter, model
