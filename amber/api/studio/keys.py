"""The caller's own account: `GET /studio/v1/account` (name and effective rate limits) and its API
keys, `GET/POST /studio/v1/keys`, `DELETE /studio/v1/keys/{prefix}`.

A key is shown once, in the answer that creates it; it is never logged or stored (the store keeps
its hash). Which listed key made the request is told by hash, since prefixes may collide.
"""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, field_validator

from amber.api import docs
from amber.api.deps import Account, Pool, Store
from amber.api.errors import not_found
from amber.api.routing import TextRoute
from amber.store.repo import KeyInfo

router = APIRouter(prefix="/studio/v1", route_class=TextRoute, responses=docs.ai21(401))


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not 1 <= len(value) <= 64 or not value.isprintable():
            raise ValueError("name must be 1-64 printable characters")
        return value


def key_json(info: KeyInfo) -> dict:
    return {"prefix": info.prefix, "name": info.name, "createdAt": info.created_at.isoformat()}


@router.get("/account")
async def get_account(account: Account, pool: Pool, store: Store) -> dict:
    """The account's name and the rate limits it runs under (its own, else the server's defaults);
    null: unlimited."""
    own = store.own_limits(account.id)
    limits = pool.config.rate_limits.override(own.rpm, own.tpm)
    return {"name": account.name, "limits": {"rpm": limits.rpm or None, "tpm": limits.tpm or None}}


@router.get("/keys")
async def list_keys(request: Request, account: Account, store: Store) -> dict:
    """The account's keys, oldest first, revoked ones included; `current`: the key of this request."""
    return {"keys": [{**key_json(k), "revoked": k.revoked, "current": k.key_hash == request.state.key_hash}
                     for k in store.list_keys(account.name)]}


@router.post("/keys", responses=docs.ai21(400, 422))
async def create_key(account: Account, store: Store, body: CreateKey | None = None) -> dict:
    """A new key for the caller's account; `key` is its only showing."""
    new = store.issue_key(account.name, body.name if body else None)
    return {"key": new.key, **key_json(new.info)}


@router.delete("/keys/{prefix}", responses=docs.ai21(404, 409))
async def revoke_key(prefix: str, account: Account, store: Store) -> dict:
    """Revoke one of the caller's active keys (the one making this request too, if asked)."""
    try:
        revoked = store.revoke_own_key(account.id, prefix)
    except ValueError as exc:
        raise HTTPException(409, f"{exc} (`amber keys revoke KEY` takes it)") from exc
    if not revoked:
        raise not_found(f"no active key with prefix {prefix!r}")
    return {"prefix": prefix, "revoked": True}
