"""`POST /studio/v1/custom-model/{id}/few-shot`: the prompt-engineering rival of a custom model, for
the compare page. The base model prompted with the first k training examples of the custom model's
dataset, k chosen as the worker's evaluation chooses it (amber/evaluation.py), so the page and the
evaluation compare the same thing. Generating with it is the ordinary completion API's job.
"""
from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from amber.api import docs
from amber.api.deps import Account, Pool, Store
from amber.api.errors import invalid
from amber.api.routing import TextRoute
from amber.api.studio.custom_models import owned_model
from amber.evaluation import Example, few_shot_prompt, fit_shots, separator_for
from amber.serving import LoadedModel
from amber.store.custom_models import ExampleRow

router = APIRouter(prefix="/studio/v1", route_class=TextRoute, responses=docs.ai21(401))
MAX_SHOTS = 64


class FewShotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    shots: int = Field(8, ge=0, le=MAX_SHOTS)
    maxTokens: int = Field(16, ge=1, le=2048)


def _examples(loaded: LoadedModel, rows: list[ExampleRow]) -> list[Example]:
    """Rows as the text the model sees: a chat row rendered by the base model's template."""
    def one(r: ExampleRow) -> Example:
        if not r.messages:
            return Example(r.prompt, r.completion)
        return Example(loaded.tokenizer.decode(loaded.chat.render(r.messages[:-1])), r.messages[-1]["content"])
    return [one(r) for r in rows]


def _build(loaded: LoadedModel, rows: list[ExampleRow], body: FewShotRequest) -> dict:
    """Tokenizes, so it runs in a worker thread."""
    train = _examples(loaded, rows)
    separator = separator_for(train)
    max_context = loaded.spec.max_context
    shots = fit_shots(loaded.tokenizer.encode, train, [body.prompt], separator, body.maxTokens, max_context,
                      body.shots)
    prompt = few_shot_prompt(train[:shots], body.prompt, separator)
    if 1 + len(loaded.tokenizer.encode(prompt)) + body.maxTokens > max_context:
        raise invalid(("body", "prompt"), f"prompt and maxTokens do not fit the base model's {max_context} "
                                          "tokens of context even without examples")
    return {"prompt": prompt, "shots": shots, "separator": separator, "stopSequences": [separator],
            "maxTokens": body.maxTokens}


@router.post("/custom-model/{model_id}/few-shot", responses=docs.ai21(400, 404, 409, 422))
async def few_shot(model_id: str, body: FewShotRequest, account: Account, pool: Pool, store: Store) -> dict:
    """The k-shot prompt for `prompt` on the custom model's base model: the first `shots` training
    rows (fewer if prompt + maxTokens would not fit the context), each followed by the separator,
    which is also the stop sequence that ends the answer."""
    model = owned_model(store, account, model_id)
    if model.dataset_deleted:
        raise HTTPException(409, f"the dataset {model.dataset_name!r} that {model.name!r} was trained on has "
                                 "been deleted, so there are no examples to prompt with")
    rows = store.datasets.rows(model.dataset_id, "train", limit=MAX_SHOTS)
    loaded = await run_in_threadpool(pool.get, model.base_model)
    built = await run_in_threadpool(_build, loaded, rows, body)
    return {**built, "baseModel": model.model_type}
