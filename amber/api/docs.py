"""What the OpenAPI documents say beyond what FastAPI derives from the routes: the error bodies and
the statuses each route answers, the bearer-key scheme, and one document for both APIs.

Description only: nothing here changes what a route does. The AI21 API's errors take FastAPI's
shapes (`{"detail": "..."}`, and for invalid input the 422 `{"detail": [{loc, msg, type}]}` that
FastAPI documents itself); the OpenAI API's take OpenAI's (`{"error": {...}}`, invalid input a 400).
"""
from __future__ import annotations

import copy
import json
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import validation_error_definition, validation_error_response_definition
from pydantic import BaseModel

REF = "#/components/schemas/"


class Detail(BaseModel):
    """Every AI21 API error but invalid input (422)."""
    detail: str


class OpenAIErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """Every OpenAI API error, invalid input (400) included."""
    error: OpenAIErrorObject


class Unhealthy(BaseModel):
    status: Literal["loading", "error"]
    model: str | None = None   # the default model, while it loads
    detail: str | None = None  # why loading it failed


_WHY = {
    400: "The body could not be parsed (not UTF-8, or a broken form)",
    401: "Missing, unknown or revoked API key",
    404: "No such model, or no such resource in this account",
    409: "A custom model that is not ready (training, failed, epoch not trained), or a dataset in use",
    413: "The uploaded file is too large",
    429: "The queue is full: retry after Retry-After seconds",
    499: "The client closed the connection first (logged; no client receives it)",
    500: "A custom model's adapter could not be loaded, or an upload could not be stored",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer", "minimum": 1}}},
}
STREAM = {200: {"description": "JSON, or with `stream: true` server-sent events",
                "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
UNHEALTHY = {503: {"model": Unhealthy, "description": "The default model is loading, or failed to load"}}
BEARER = {"type": "http", "scheme": "bearer", "description": "An API key (`amber keys create ACCOUNT`)"}


def _answer(status: int, model: type[BaseModel], why: str | None = None) -> dict[str, Any]:
    headers = {"headers": _HEADERS[status]} if status in _HEADERS else {}
    return {"model": model, "description": why or _WHY[status], **headers}


# FastAPI documents this itself for a route with declared parameters; a route reading its own
# body (the dataset upload) names it. install() makes sure the schema it refers to is there.
INVALID = {"description": "Invalid input; `loc` names the field",
           "content": {"application/json": {"schema": {"$ref": REF + "HTTPValidationError"}}}}


def ai21(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for an AI21 API route or router that answers these statuses."""
    return {status: INVALID if status == 422 else _answer(status, Detail) for status in statuses}


def openai(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for an OpenAI API route or router that answers these statuses. The `4XX` entry
    covers the rest (405, say) and keeps FastAPI from documenting a 422 that this API never answers."""
    why = {400: "Invalid input (or a body that could not be parsed); `param` names the field"}
    return {**{status: _answer(status, OpenAIErrorBody, why.get(status)) for status in statuses},
            "4XX": {"model": OpenAIErrorBody, "description": "Any other client error, in the same shape"}}


def install(app: FastAPI, mount: tuple[str, FastAPI, str] | None = None) -> None:
    """Replaces `app.openapi`: FastAPI's document with the bearer scheme declared, and with
    `mount` = (prefix, sub-application, prefix for its clashing schema names) merged in."""
    build, built = app.openapi, []

    def openapi() -> dict[str, Any]:
        if not built:
            doc = completed(build())
            if mount is not None:
                prefix, sub, rename = mount
                doc = merged(doc, sub.openapi(), prefix, rename)
            built.append(doc)
        return built[0]

    app.openapi = openapi


def completed(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with the bearer scheme on every operation that answers 401 (that needs a key), and
    with the schemas INVALID refers to, where something refers to them."""
    components = doc.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = BEARER
    if json.dumps(REF + "HTTPValidationError") in json.dumps(doc):
        schemas = components.setdefault("schemas", {})
        schemas.setdefault("ValidationError", validation_error_definition)
        schemas.setdefault("HTTPValidationError", validation_error_response_definition)
    for item in doc.get("paths", {}).values():
        for operation in item.values():
            if "401" in operation.get("responses", {}):
                operation["security"] = [{"bearer": []}]
    return doc


def merged(doc: dict[str, Any], sub: dict[str, Any], prefix: str, rename: str) -> dict[str, Any]:
    """`sub`'s operations added to `doc` under `prefix`, and its schemas beside doc's: a name doc
    already uses (both APIs have a `ResponseFormat`) gets `rename` before it, and every $ref follows."""
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    theirs = sub.get("components", {})
    names = {name: rename + name if name in schemas else name for name in theirs.get("schemas", {})}
    assert not set(names.values()) & set(schemas), "a renamed schema still clashes"
    renamed = _refs_renamed(copy.deepcopy(sub), {REF + old: REF + new for old, new in names.items()})
    for old, schema in renamed.get("components", {}).get("schemas", {}).items():
        schemas[names[old]] = schema
    components.setdefault("securitySchemes", {}).update(theirs.get("securitySchemes", {}))
    doc.setdefault("paths", {}).update({prefix + path: item for path, item in renamed.get("paths", {}).items()})
    return doc


def _refs_renamed(node: Any, refs: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: refs.get(v, v) if k == "$ref" else _refs_renamed(v, refs) for k, v in node.items()}
    if isinstance(node, list):
        return [_refs_renamed(v, refs) for v in node]
    return node
