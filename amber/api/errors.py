"""Errors the API answers with, in FastAPI's shapes: 422 `{"detail": [{loc, msg, type}]}`, others
`{"detail": "..."}`."""
from __future__ import annotations

from fastapi import HTTPException


def invalid(loc: tuple, msg: str) -> HTTPException:
    """A 422 naming the offending field, shaped like FastAPI's own validation errors."""
    return HTTPException(status_code=422, detail=[{"loc": list(loc), "msg": msg, "type": "value_error"}])


def not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=what)
