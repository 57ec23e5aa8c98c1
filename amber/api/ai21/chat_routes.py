"""AI21 chat routes: Jamba's `POST /studio/v1/chat/completions` (streamed or not) and J2's
`POST /studio/v1/{model}/chat`. Validate, render the conversation with the model's chat template,
call the engine, convert back. Errors keep the AI21 API's FastAPI shapes.
"""
from __future__ import annotations

import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request

from amber.api.ai21 import chat_convert as cc
from amber.api.ai21 import chat_schemas as cs
from amber.api.ai21 import convert
from amber.api import docs, offload
from amber.api.deps import Account, Files, Pool, Store
from amber.api.routing import TextRoute
from amber.api.errors import invalid, not_found
from amber.api.generation import generate_all, open_streams
from amber.api.metering import meter
from amber.api.models import ModelNotFound, ResolvedModel, resolve_model
from amber.api.streaming import deltas, event_stream
from amber.engine.chat_template import NoChatTemplate

router = APIRouter(prefix="/studio/v1", route_class=TextRoute, responses=docs.ai21(401))


async def _model(pool: Pool, store: Store, files: Files, account: Account, name: str) -> ResolvedModel:
    try:
        return await resolve_model(pool, store, files, account, name)
    except ModelNotFound:
        raise not_found(f"model {name!r} does not exist (GET /studio/v1/models lists them)") from None


async def _prompt(model: ResolvedModel, messages: list[dict[str, str]], max_tokens: int | None
                  ) -> tuple[tuple[int, ...], int]:
    """The conversation's prompt ids and the max_tokens to use (by default, what the context leaves)."""
    loaded = model.loaded
    try:
        ids = await offload.run(loaded.chat.render, messages, size=len(repr(messages)), limit=offload.INLINE_CHARS)
    except NoChatTemplate:
        raise invalid(("body", "model"), f"model {model.name!r} has no chat template") from None
    room = loaded.spec.max_context - 1 - len(ids)
    if max_tokens is None:
        max_tokens = max(1, min(cs.LIMITS.max_tokens, room))
    if max_tokens > room:
        raise invalid(("body", "messages"), f"the conversation is {len(ids)} tokens; with {max_tokens} tokens to "
                                            f"generate that exceeds the model's context of {loaded.spec.max_context}")
    return tuple(ids), max_tokens


def _check_batch(model: ResolvedModel, n: int, field: str) -> None:
    if n > model.loaded.engine.max_batch:
        raise invalid(("body", field), f"{field} {n} exceeds this server's batch of {model.loaded.engine.max_batch} "
                                       "(amber serve --max-batch)")


@router.post("/chat/completions", responses={**docs.STREAM, **docs.ai21(400, 404, 409, 429, 499, 500)})
async def chat_completions(body: cs.ChatCompletionsRequest, account: Account, pool: Pool, store: Store,
                           files: Files, http: Request):
    usage = meter(http, body.model)
    cc.refuse_unsupported(body)
    model = await _model(pool, store, files, account, body.model)
    _check_batch(model, body.n, "n")
    ids, max_tokens = await _prompt(model, cc.jamba_messages(body), body.max_tokens)
    rid = f"chat-{uuid.uuid4().hex}"
    request = model.request(rid, ids, cc.jamba_params(body, max_tokens), score_prompt=False)
    if not body.stream:
        (out,) = await generate_all(http, model.loaded.engine, [request])
        usage.add(ids, out)
        return cc.jamba_response(rid, out, usage)
    streams = await open_streams(http, model.loaded.engine, [request])

    async def chunks() -> AsyncIterator[dict]:
        yield cc.jamba_chunk(rid, {"role": "assistant"})
        async for d in deltas(streams, [request], model.loaded.tokenizer, usage):
            yield cc.jamba_delta_chunk(rid, d, usage)

    return event_stream(chunks(), usage)


@router.post("/{model}/chat", responses=docs.ai21(400, 404, 409, 429, 499, 500))
async def j2_chat(model: str, body: cs.J2ChatRequest, account: Account, pool: Pool, store: Store,
                  files: Files, http: Request) -> dict:
    usage = meter(http, model)
    resolved = await _model(pool, store, files, account, model)
    _check_batch(resolved, body.numResults, "numResults")
    ids, _ = await _prompt(resolved, cc.j2_messages(body), body.maxTokens)
    params = convert.sampling_params(body, resolved.loaded.tokenizer)
    rid = str(uuid.uuid4())
    (out,) = await generate_all(http, resolved.loaded.engine, [resolved.request(rid, ids, params, score_prompt=False)])
    usage.add(ids, out)
    return cc.j2_response(rid, out)
