"""OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions): validate,
convert, call the engine, convert back. Mounted as its own sub-application, whose errors take
OpenAI's shape (errors.py). Same keys and models as the AI21 API.
"""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request

from amber.api import docs, offload
from amber.api.deps import Account, Files, Pool, Store
from amber.api.generation import generate_all, open_streams
from amber.api.metering import meter
from amber.api.models import ModelNotFound, ResolvedModel, available_models, resolve_model
from amber.api.openai import convert as c
from amber.api.openai import schemas as s
from amber.api.openai.errors import OpenAIError, invalid
from amber.api.routing import TextRoute
from amber.api.streaming import deltas, event_stream
from amber.engine.chat_template import NoChatTemplate
from amber.serving import LoadedModel

router = APIRouter(route_class=TextRoute, responses=docs.openai(401))


async def _model(pool: Pool, store: Store, files: Files, account: Account, name: str) -> ResolvedModel:
    try:
        return await resolve_model(pool, store, files, account, name)
    except ModelNotFound:
        raise OpenAIError(404, f"The model {name!r} does not exist (GET /v1/models lists them)", "model",
                          "model_not_found") from None


def _check_size(loaded: LoadedModel, ids: list[int], max_tokens: int, n: int, param: str) -> None:
    if n > loaded.engine.max_batch:
        raise invalid("n", f"n {n} exceeds this server's batch of {loaded.engine.max_batch} (amber serve --max-batch)")
    limit = loaded.spec.max_context
    if 1 + len(ids) + max_tokens > limit:
        raise invalid(param, f"This model's maximum context length is {limit} tokens. However, you requested "
                             f"{1 + len(ids) + max_tokens} tokens ({1 + len(ids)} in the {param}, {max_tokens} in "
                             "the completion). Please reduce the length of the prompt or completion.",
                      "context_length_exceeded")


def _include_usage(body: s.Sampling) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


@router.get("/models")
async def list_models(account: Account, pool: Pool, store: Store) -> dict:
    created = int(time.time())
    return {"object": "list", "data": [c.model_card(m, created) for m in available_models(pool, store, account)]}


@router.get("/models/{model}", responses=docs.openai(404))
async def get_model(model: str, account: Account, pool: Pool, store: Store) -> dict:
    for m in available_models(pool, store, account):
        if m.id == model:
            return c.model_card(m, int(time.time()))
    raise OpenAIError(404, f"The model {model!r} does not exist", "model", "model_not_found")


def _prompt_size(prompt: str | list) -> int:
    """How much tokenizing (characters) or checking (token ids) a `prompt` field asks for."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) if isinstance(p, (str, list)) else 1 for p in prompt)


@router.post("/completions", responses={**docs.STREAM, **docs.openai(400, 404, 409, 429, 499, 500)})
async def completions(body: s.CompletionRequest, account: Account, pool: Pool, store: Store, files: Files,
                      http: Request):
    usage = meter(http, body.model)
    c.refuse_unsupported(body)
    model = await _model(pool, store, files, account, body.model)
    loaded, tokenizer = model.loaded, model.loaded.tokenizer
    prompts = await offload.run(c.prompts, body.prompt, tokenizer, size=_prompt_size(body.prompt),
                                limit=offload.INLINE_CHARS)
    for _, ids, _ in prompts:
        _check_size(loaded, ids, body.max_tokens, body.n, "prompt")
    params = c.sampling_params(body, tokenizer, max_tokens=body.max_tokens, top_k=body.logprobs or 0)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    requests = [model.request(f"{rid}-{i}", ids, params, score_prompt=body.echo and body.logprobs is not None)
                for i, (_, ids, _) in enumerate(prompts)]
    if not body.stream:
        outputs = await generate_all(http, loaded.engine, requests)
        tokens = sum(len(o.prompt) + sum(len(x.tokens) for x in o.completions) for o in outputs)
        choices = await offload.run(c.completion_choices, outputs, prompts, body, tokenizer, usage, size=tokens,
                                    limit=offload.INLINE_TOKENS)
        return c.completion_body(rid, created, model.name, choices, usage.as_dict())
    streams = await open_streams(http, loaded.engine, requests)

    async def chunks() -> AsyncIterator[dict]:
        if body.echo:
            yield c.completion_body(rid, created, model.name, c.echo_choices(prompts, body.n), None)
        sent: dict[int, int] = {}
        async for d in deltas(streams, requests, tokenizer, usage):
            base = sent.get(d.choice, len(prompts[d.choice // body.n][0]) if body.echo else 0)
            sent[d.choice] = base + len(d.text)
            yield c.completion_body(rid, created, model.name, [c.completion_delta(d, base, body, tokenizer)], None)
        if _include_usage(body):
            yield c.completion_body(rid, created, model.name, [], usage.as_dict())

    return event_stream(chunks(), usage)


@router.post("/chat/completions", responses={**docs.STREAM, **docs.openai(400, 404, 409, 429, 499, 500)})
async def chat_completions(body: s.ChatCompletionRequest, account: Account, pool: Pool, store: Store,
                           files: Files, http: Request):
    usage = meter(http, body.model)
    c.refuse_unsupported(body)
    model = await _model(pool, store, files, account, body.model)
    loaded, tokenizer = model.loaded, model.loaded.tokenizer
    try:
        messages = c.messages(body)
        ids = await offload.run(loaded.chat.render, messages, size=len(repr(messages)), limit=offload.INLINE_CHARS)
    except NoChatTemplate:
        raise invalid("model", f"model {body.model!r} has no chat template; use /v1/completions") from None
    max_tokens = body.max_completion_tokens or body.max_tokens or max(
        1, min(s.LIMITS.max_tokens, loaded.spec.max_context - 1 - len(ids)))
    _check_size(loaded, ids, max_tokens, body.n, "messages")
    top_k = (body.top_logprobs or 0) if body.logprobs else 0
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    request = model.request(rid, ids, c.sampling_params(body, tokenizer, max_tokens=max_tokens, top_k=top_k),
                            score_prompt=False)
    if not body.stream:
        (out,) = await generate_all(http, loaded.engine, [request])
        choices = c.chat_choices(out, request.prompt_ids, body.logprobs, tokenizer, usage)
        return c.chat_body(rid, created, model.name, choices, usage.as_dict())
    streams = await open_streams(http, loaded.engine, [request])

    async def chunks() -> AsyncIterator[dict]:
        for j in range(body.n):
            yield c.chat_chunk(rid, created, model.name, [c.chat_role_choice(j)])
        async for d in deltas(streams, [request], tokenizer, usage):
            yield c.chat_chunk(rid, created, model.name, [c.chat_delta_choice(d, tokenizer, body.logprobs)])
        if _include_usage(body):
            yield c.chat_chunk(rid, created, model.name, [], usage.as_dict())

    return event_stream(chunks(), usage)
