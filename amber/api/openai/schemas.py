"""OpenAI's wire format for /v1/completions and /v1/chat/completions requests, as pydantic models.
Validation only, no behaviour; responses are built as plain dicts in convert.py.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send whatever their SDK version
knows: `store`, `metadata`, `service_tier`...), and an explicit `null` means "not given". Fields
Amber cannot honour (`suffix`, tools, non-text content, JSON modes) are refused by name in
convert.py rather than silently dropped.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from amber.config import Limits

LIMITS = Limits()

Finite = dict(allow_inf_nan=False)
Stop = Annotated[str, Field(max_length=200)] | Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]],
                                                     Field(max_length=LIMITS.max_stop_sequences)]
Bias = dict[str, Annotated[float, Field(ge=-100, le=100, **Finite)]]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """What both endpoints share."""
    model: str
    temperature: Annotated[float, Field(ge=0, le=2, **Finite)] = 1.0
    top_p: Annotated[float, Field(ge=0, le=1, **Finite)] = 1.0
    n: Annotated[int, Field(ge=1, le=LIMITS.max_num_results)] = 1
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2, **Finite)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2, **Finite)] = 0.0
    logit_bias: Bias | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    user: str | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0, le=LIMITS.max_tokens)] = 16
    logprobs: Annotated[int, Field(ge=0, le=LIMITS.max_top_k_return)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None


class ContentPart(Body):
    type: str
    text: str | None = None


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] = ""


class ResponseFormat(Body):
    type: str


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=LIMITS.max_tokens)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=LIMITS.max_tokens)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=LIMITS.max_top_k_return)] | None = None
    tools: list[dict] | None = None
    functions: list[dict] | None = None
    response_format: ResponseFormat | None = None
