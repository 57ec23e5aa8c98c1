"""FastAPI dependencies: the caller's account from `Authorization: Bearer KEY`, and app state."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from amber.api import rate_limits
from amber.files import SharedFiles
from amber.serving import ModelPool
from amber.store.repo import AccountInfo, hash_key
from amber.store.repo import Store as StoreType


def get_store(request: Request) -> StoreType:
    return request.app.state.store


def get_pool(request: Request) -> ModelPool:
    return request.app.state.pool


def get_files(request: Request) -> SharedFiles:
    return request.app.state.files


def current_account(request: Request, store: Annotated[StoreType, Depends(get_store)]) -> AccountInfo:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer KEY' "
                                 "(create one with `amber keys create ACCOUNT`)",
                            headers={"WWW-Authenticate": "Bearer"})
    owner = getattr(request.state, "key_owner", None)  # the meter's lookup of this same header
    account = owner[0] if owner is not None else store.account_for_key(key.strip())
    if account is None:
        raise HTTPException(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    rate_limits.remember(request, account.id, store.own_limits(account.id))
    request.state.key_hash = hash_key(key.strip())  # which of the account's keys this is; never the key
    return account


Account = Annotated[AccountInfo, Depends(current_account)]
Pool = Annotated[ModelPool, Depends(get_pool)]
Files = Annotated[SharedFiles, Depends(get_files)]
Store = Annotated[StoreType, Depends(get_store)]
