"""OpenAI's error shape for every /v1 answer that is not a success:
`{"error": {"message", "type", "param", "code"}}`, which the openai SDK reads into its typed errors.

Invalid input is a 400 naming the offending field in `param` (OpenAI's status, where FastAPI would
say 422). Installed on the /v1 sub-application only; the AI21 API keeps FastAPI's shapes.
"""
from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from amber.api.routing import without_surrogates
from amber.serving import ModelUnavailable

# The `code` OpenAI gives errors that other layers raise as plain HTTPExceptions, by status.
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 499: "client_closed_request"}


class OpenAIError(Exception):
    """An error to answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def invalid(param: str, message: str, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param, code)


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The error object; text the client sent (a model name, a field) may hold lone surrogates,
    which are sent back as escapes."""
    kind = "requests" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": without_surrogates(message), "type": kind,
                      "param": None if param is None else without_surrogates(param), "code": code}}


def _param(loc: tuple) -> str | None:
    """FastAPI's ("body", "messages", 0, "role") as OpenAI's "messages.0.role", without the
    branch tags pydantic adds inside a union ("stop", "list[...]", 0 -> "stop.0")."""
    parts = [str(p) for p in (loc[1:] if loc and loc[0] == "body" else loc)
             if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _CODES.get(exc.status_code)
    return JSONResponse(body(exc.status_code, str(exc.detail), None, code), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # the most specific error: inside a union, pydantic reports every branch's ("stop": not a string;
    # "stop.1": too short), and the deepest is the one that says what is wrong
    first = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={"loc": (), "msg": "invalid request"})
    param = _param(tuple(first.get("loc", ())))
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return JSONResponse(body(400, message, param), status_code=400)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(body(503, str(exc), "model", "model_unavailable"), status_code=503)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ModelUnavailable, _unavailable)
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
