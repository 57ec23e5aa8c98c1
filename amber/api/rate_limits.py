"""Rate limits on the wire: which account and limits a request runs under, its admission as a 429
with `Retry-After`, and OpenAI's `x-ratelimit-*` headers on every answer of a limited account.

The limiter (amber/ratelimit.py) owns windows and admission; this module only translates. Every
generating route is limited because it generates through generation.py, which admits here; listing
models, tokenizing and /health are not. The 429 is an HTTPException, so each API renders it in its
own error shape.
"""
from __future__ import annotations

import math

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from amber.config import RateLimits
from amber.engine.types import GenerationRequest
from amber.ratelimit import Limiter, RateLimited, Reservation, WindowState, whole_seconds
from amber.store.repo import OwnLimits

_HEADERS = "amber_rate_limit_headers"  # request.state key: headers for the answer


def remember(http: Request, account_id: int, own: OwnLimits) -> None:
    """Called by the auth dependency: the account and limits the request runs under (its own,
    else the server's defaults)."""
    defaults: RateLimits = http.app.state.pool.config.rate_limits
    http.state.rate_limit_account = (account_id, defaults.override(own.rpm, own.tpm))


def reserve(requests: list[GenerationRequest]) -> list[int]:
    """The most tokens each engine request can use: BOS + prompt, and max_tokens per sample."""
    return [1 + len(r.prompt_ids) + r.params.num_results * r.params.max_tokens for r in requests]


def admit(http: Request, requests: list[GenerationRequest]) -> Reservation:
    """Count the request against its account's limits, or refuse it with a 429."""
    limiter: Limiter = http.app.state.limiter
    account_id, limits = getattr(http.state, "rate_limit_account", (None, RateLimits()))
    if account_id is None:
        limits = RateLimits()
    try:
        reservation, state = limiter.admit(account_id, limits, reserve(requests))
    except RateLimited as exc:
        headers = {**headers_for(exc.state), "Retry-After": str(whole_seconds(exc.state.retry_after_s))}
        raise HTTPException(429, str(exc), headers=headers) from exc
    if state is not None:
        setattr(http.state, _HEADERS, headers_for(state))
    return reservation


def _duration(s: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "20ms"."""
    if s < 1:
        return f"{max(0, math.ceil(s * 1000))}ms"
    s = math.ceil(s)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


def headers_for(state: WindowState) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, for the limits that are set."""
    headers = {}
    if state.limits.rpm:
        headers |= {"x-ratelimit-limit-requests": str(state.limits.rpm),
                    "x-ratelimit-remaining-requests": str(state.requests_left),
                    "x-ratelimit-reset-requests": _duration(state.requests_reset_s)}
    if state.limits.tpm:
        headers |= {"x-ratelimit-limit-tokens": str(state.limits.tpm),
                    "x-ratelimit-remaining-tokens": str(state.tokens_left),
                    "x-ratelimit-reset-tokens": _duration(state.tokens_reset_s)}
    return headers


class HeadersMiddleware:
    """Adds the headers an admission left in the request's state to the answer's start, streamed
    answers included (a dependency's Response cannot reach a returned StreamingResponse)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})

        async def send_with_headers(message: Message) -> None:
            headers = state.get(_HEADERS)
            if message["type"] == "http.response.start" and headers:
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in headers.items() if k.encode() not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
