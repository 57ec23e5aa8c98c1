"""The route class every JSON API router uses: it refuses text that is not Unicode before any
handler, schema or error message sees it.

JSON may spell a lone UTF-16 surrogate (`"a\\ud800b"`); Python's parser turns it into a `str`
that cannot be encoded as UTF-8, so the tokenizer, the database and even the error handler echoing
the input would fail on it (a 500). Here such a body is a validation error naming the field, in
whichever shape the app answers validation errors (AI21's 422, OpenAI's 400).
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # cheap test before a full walk


def surrogate_path(value: Any, path: tuple = ()) -> tuple | None:
    """Where the first string (or object key) holding a lone surrogate sits, or None."""
    if isinstance(value, str):
        return path if _has_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _has_surrogate(key):
                return (*path, key.encode("utf-8", "backslashreplace").decode())
            found = surrogate_path(item, (*path, key))
            if found is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = surrogate_path(item, (*path, i))
            if found is not None:
                return found
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def without_surrogates(text: str) -> str:
    """`text` with any lone surrogate written as its escape (`\\ud800`), safe to send back."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class TextRoute(APIRoute):
    """An APIRoute whose JSON bodies must hold valid Unicode text only."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            if content_type is None or "json" in content_type:  # FastAPI reads both as JSON
                body = await request.body()  # cached: the handler's own parse reads it again
                if _ESCAPED_SURROGATE.search(body):
                    _refuse_surrogates(body)
            return await handler(request)

        return checked


def _refuse_surrogates(body: bytes) -> None:
    try:
        data = json.loads(body)
    except ValueError:
        return  # not JSON: the handler's own parse reports it
    path = surrogate_path(data)
    if path is not None:
        raise RequestValidationError([{
            "loc": ("body", *path), "type": "string_unicode",
            "msg": "Input should be valid Unicode text: it holds a lone UTF-16 surrogate (\\ud800-\\udfff)"}])
