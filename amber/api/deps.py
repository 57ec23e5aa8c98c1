"""FastAPI dependencies: the caller's account from `Authorization: Bearer KEY`, and app state."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from amber.serving import ModelPool
from amber.store.repo import AccountInfo, Store


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_pool(request: Request) -> ModelPool:
    return request.app.state.pool


def current_account(request: Request, store: Annotated[Store, Depends(get_store)]) -> AccountInfo:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer KEY' "
                                 "(create one with `amber keys create ACCOUNT`)",
                            headers={"WWW-Authenticate": "Bearer"})
    account = store.account_for_key(key.strip())
    if account is None:
        raise HTTPException(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return account


Account = Annotated[AccountInfo, Depends(current_account)]
Pool = Annotated[ModelPool, Depends(get_pool)]
StoreDep = Annotated[Store, Depends(get_store)]
