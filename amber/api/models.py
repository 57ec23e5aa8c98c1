"""What a request's `model` names, for every API, and the models an account may address.

The one place both are decided, so that custom models (an account's fine-tunes, addressed by name,
private to it) reach every API at once: the registry's general models by name or alias, then the
account's custom models by name (their default epoch, on their base's engine). Raises ModelNotFound
rather than an HTTP error; each API answers in its own error shape. A custom model that is not
ready yet is an HTTPException (409), which each API also renders in its shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from amber.api.custom import adapter_for, notice_deletions
from amber.api.offload import running_model
from amber.engine.types import AdapterRef, GenerationRequest, SamplingParams
from amber.files import SharedFiles
from amber.serving import LoadedModel, ModelPool
from amber.store.repo import AccountInfo, Store


class ModelNotFound(Exception):
    """No model of that name that this account may use (another account's custom model included)."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str               # as the caller wrote it; responses echo it
    loaded: LoadedModel     # the running base model
    adapter: AdapterRef | None = None  # a custom model's adapter on that base

    def request(self, request_id: str, prompt_ids: list[int] | tuple[int, ...], params: SamplingParams,
                score_prompt: bool = True) -> GenerationRequest:
        """An engine request for this model: every route builds its requests here, so what a
        custom model adds to them (its adapter) is added once."""
        return GenerationRequest(request_id, tuple(prompt_ids), params, score_prompt, adapter=self.adapter)


@dataclass(frozen=True)
class ModelInfo:
    id: str                 # what a request's `model` may say
    owned_by: str           # "amber" for general models, the account's name for its custom ones
    root: str               # the registry model behind it


async def resolve_model(pool: ModelPool, store: Store, files: SharedFiles, account: AccountInfo,
                        name: str) -> ResolvedModel:
    """The running model `name` addresses for `account`, loading it on first use."""
    if pool.registry.resolve(name) is not None:
        return ResolvedModel(name, await running_model(pool, name))
    await notice_deletions(pool, files)
    custom = store.custom_models.find(account.id, name) if not name.isdigit() else None
    base = pool.registry.resolve(custom.base_model) if custom is not None else None
    if base is None:
        raise ModelNotFound(name)
    adapter = await adapter_for(files, custom, None)
    return ResolvedModel(name, await running_model(pool, base.name), adapter)


def available_models(pool: ModelPool, store: Store, account: AccountInfo) -> list[ModelInfo]:
    """Every name `account` may put in `model`: each general model and its aliases, then the
    account's completed custom models."""
    general = [ModelInfo(name, "amber", spec.name)
               for spec in pool.registry.models.values() for name in (spec.name, *spec.aliases)]
    return general + [ModelInfo(m.name, account.name, m.base_model)
                      for m in store.custom_models.list(account.id) if m.status == "COMPLETED"]
