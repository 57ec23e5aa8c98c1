"""The studio in a browser: static pages on the public API, deletable without touching the rest.

`install(app)` serves the single page at `/` and its client-side routes (/playground, /compare,
/generate, /account, /usage), and the assets under /static, all from this package: nothing is fetched from
elsewhere at run time. Every page response carries a Content-Security-Policy that allows scripts,
styles and connections from this origin only (no inline script, no eval), so that model output or
a dataset row can never run as code even if some path rendered it as HTML (none does: the scripts
only ever set textContent). The API key lives in the tab's sessionStorage and travels in the
Authorization header; it is never put in a URL.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC = Path(__file__).parent / "static"
PAGES = ("/", "/playground", "/compare", "/generate", "/account", "/usage")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",  # revalidate: a new version of the pages is seen at once
}


class _Assets(StaticFiles):
    """StaticFiles with the pages' security headers on every asset."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      *((k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items())]
            await send(message)
        await super().__call__(scope, receive, with_headers)


def _page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


def install(app: FastAPI) -> None:
    for path in PAGES:
        app.add_api_route(path, _page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/static", _Assets(directory=STATIC), name="static")
