"""FastAPI dependencies: the caller's account from `Authorization: Bearer KEY`, and app state.
The app-state readers are `async def`: FastAPI runs a plain `def` dependency in a worker thread,
a hop that costs more than reading an attribute (api/offload.py)."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from amber.api import rate_limits
from amber.files import SharedFiles
from amber.serving import ModelPool
from amber.store.repo import AccountInfo, OwnLimits, hash_key
from amber.store.repo import Store as StoreType


async def get_store(request: Request) -> StoreType:
    return request.app.state.store


async def get_pool(request: Request) -> ModelPool:
    return request.app.state.pool


async def get_files(request: Request) -> SharedFiles:
    return request.app.state.files


async def current_account(request: Request, store: Annotated[StoreType, Depends(get_store)]) -> AccountInfo:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer KEY' "
                                 "(create one with `amber keys create ACCOUNT`)",
                            headers={"WWW-Authenticate": "Bearer"})
    owner = getattr(request.state, "key_owner", None)  # the meter's lookup of this same header
    if owner is not None:
        account, limits = owner[0], request.state.own_limits
    else:  # not a metered route: the lookups, off the event loop
        account, limits = await run_in_threadpool(_lookup, store, key.strip())
    if account is None:
        raise HTTPException(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    rate_limits.remember(request, account.id, limits)
    request.state.key_hash = hash_key(key.strip())  # which of the account's keys this is; never the key
    return account


def _lookup(store: StoreType, key: str) -> tuple[AccountInfo | None, OwnLimits | None]:
    account = store.account_for_key(key)
    return account, None if account is None else store.own_limits(account.id)


Account = Annotated[AccountInfo, Depends(current_account)]
Pool = Annotated[ModelPool, Depends(get_pool)]
Files = Annotated[SharedFiles, Depends(get_files)]
Store = Annotated[StoreType, Depends(get_store)]
