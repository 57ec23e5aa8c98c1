"""AI21 Studio routes: validate, convert, call the engine, convert back. Nothing else."""
from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from amber.api.ai21 import convert
from amber.api.ai21 import schemas as s
from amber.api.ai21.j2_tokenizer import j2_tokenize
from amber.api.custom import resolve_custom
from amber.api import docs, offload
from amber.api.deps import Account, Files, Pool, Store
from amber.api.routing import TextRoute
from amber.api.errors import invalid, not_found
from amber.api.offload import running_model
from amber.api.generation import generate_all
from amber.api.metering import meter
from amber.api.streaming import Usage
from amber.engine.types import AdapterRef, GenerationRequest
from amber.serving import LoadedModel, ModelPool

router = APIRouter(prefix="/studio/v1", route_class=TextRoute, responses=docs.ai21(401))


async def _model(pool: ModelPool, name: str) -> LoadedModel:
    if pool.registry.resolve(name) is None:
        raise not_found(f"model {name!r} does not exist (GET /studio/v1/models lists them)")
    return await running_model(pool, name)


@router.post("/{model}/complete", response_model=s.CompleteResponse, response_model_exclude_none=False,
             responses=docs.ai21(400, 404, 429, 499))
async def complete(model: str, body: s.CompleteRequest, account: Account, pool: Pool,
                   http: Request) -> s.CompleteResponse:
    usage = meter(http, model)
    return await _complete(await _model(pool, model), body, http, None, usage)


@router.post("/{model}/{custom}/complete", response_model=s.CompleteResponse, response_model_exclude_none=False,
             responses=docs.ai21(400, 404, 409, 429, 499, 500))
async def complete_custom(model: str, custom: str, body: s.CompleteRequest, account: Account, pool: Pool,
                          store: Store, files: Files, http: Request) -> s.CompleteResponse:
    usage = meter(http, custom)
    if pool.registry.resolve(model) is None:
        raise not_found(f"model {model!r} does not exist (GET /studio/v1/models lists them)")
    loaded, adapter, _ = await resolve_custom(pool, store, files, account, model, custom, body.epoch)
    return await _complete(loaded, body, http, adapter, usage)


async def _complete(loaded: LoadedModel, body: s.CompleteRequest, http: Request,
                    adapter: AdapterRef | None, usage: Usage) -> s.CompleteResponse:
    tokenizer = loaded.tokenizer
    ids, ranges = await offload.run(tokenizer.encode_with_offsets, body.prompt, size=len(body.prompt),
                                    limit=offload.INLINE_CHARS)
    if body.numResults > loaded.engine.max_batch:
        raise invalid(("body", "numResults"), f"numResults {body.numResults} exceeds this server's batch "
                                              f"of {loaded.engine.max_batch} (amber serve --max-batch)")
    limit = loaded.spec.max_context
    if 1 + len(ids) + body.maxTokens > limit:
        raise invalid(("body", "prompt"), f"prompt is {len(ids)} tokens; with maxTokens {body.maxTokens} "
                                          f"that exceeds the model's context of {limit} tokens")
    request = GenerationRequest(str(uuid.uuid4()), tuple(ids), convert.sampling_params(body, tokenizer),
                                adapter=adapter)
    (out,) = await generate_all(http, loaded.engine, [request])
    usage.add(request.prompt_ids, out)
    tokens = len(out.prompt) + sum(len(c.tokens) for c in out.completions)
    return await offload.run(convert.complete_response, out, body.prompt, ranges, tokenizer, body.topKReturn,
                             size=tokens, limit=offload.INLINE_TOKENS)


@router.post("/tokenize", response_model=s.TokenizeResponse, responses=docs.ai21(400, 404))
async def tokenize(body: s.TokenizeRequest, account: Account, pool: Pool) -> s.TokenizeResponse:
    if body.tokenizer == "j2":
        if body.model is not None:
            raise invalid(("body", "model"), 'give either "model" or "tokenizer": "j2", not both')
        pieces = await run_in_threadpool(j2_tokenize, body.text)
    else:
        loaded = await _model(pool, body.model or pool.registry.default)
        pieces = await run_in_threadpool(convert.token_pieces, body.text, loaded.tokenizer)
    return convert.tokenize_response(body.text, pieces)


@router.get("/models")
async def list_models(account: Account, pool: Pool) -> dict:
    registry = pool.registry
    return {"models": [{"name": spec.name, "aliases": list(spec.aliases), "dtype": spec.dtype,
                        "maxContext": spec.max_context, "default": spec.name == registry.default,
                        "loaded": pool.is_loaded(spec.name)} for spec in registry.models.values()]}
