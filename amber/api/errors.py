"""Errors the API answers with, in FastAPI's shapes: 422 `{"detail": [{loc, msg, type}]}`, others
`{"detail": "..."}`."""
from __future__ import annotations

import math
from typing import Any

from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from amber.api.routing import without_surrogates


def invalid(loc: tuple, msg: str, rows: list[int] | None = None) -> HTTPException:
    """A 422 naming the offending field, shaped like FastAPI's own validation errors; `rows`: the
    numbers of an uploaded file's rows at fault, every one (the message cites the first few)."""
    error = {"loc": list(loc), "msg": msg, "type": "value_error"}
    return HTTPException(status_code=422, detail=[{**error, "rows": rows} if rows else error])


def not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=what)


def _json_safe(value: Any) -> Any:
    """NaN and infinities (which Python's JSON parser accepts) echoed back as strings, and lone
    surrogates as their escapes, since a strict UTF-8 JSON response cannot carry either."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return without_surrogates(value)
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 shape, safe for any input the client sent."""
    return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})


async def unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A registry model that cannot be loaded (serving.ModelUnavailable): 503, the reason in one sentence."""
    return JSONResponse(status_code=503, content={"detail": without_surrogates(str(exc))})
