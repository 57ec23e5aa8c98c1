"""AI21's two chat wire formats, as pydantic models: Jamba's `chat/completions` (snake_case,
OpenAI-like) and J2's `{model}/chat` (camelCase, J2 sampling parameters). Validation only.

Unknown fields are refused with a 422 naming them, as elsewhere in the AI21 API; what the ai21 SDKs
send (`tool_calls: null` on assistant turns, `model` in a J2 chat body) is accepted.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from amber.api.ai21.schemas import LIMITS, CompleteRequest, Truncate

Stop = Annotated[str, Field(max_length=200)] | Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]],
                                                     Field(max_length=LIMITS.max_stop_sequences)]


class JambaMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant", "system", "tool"]
    content: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object"]


class ChatCompletionsRequest(BaseModel):
    """Jamba chat. temperature defaults to Jamba's 0.4; max_tokens to whatever the context leaves."""
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: Annotated[list[JambaMessage], Field(min_length=1)]
    n: Annotated[int, Field(ge=1, le=LIMITS.max_num_results), Truncate] = 1
    max_tokens: Annotated[int, Field(ge=1, le=LIMITS.max_tokens), Truncate] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 0.4
    top_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 1.0
    stop: Stop | None = None
    stream: bool = False
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None   # Amber's addition: reproducible sampling
    tools: list[dict] | None = None
    documents: list[dict] | None = None
    response_format: ResponseFormat | None = None


class J2ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    text: str


class J2ChatRequest(CompleteRequest):
    """J2 chat: J2's sampling parameters, with a conversation where the prompt was."""
    prompt: None = Field(None, description="not used: the system text and messages make the prompt")
    system: Annotated[str, Field(max_length=LIMITS.max_prompt_chars)]
    messages: Annotated[list[J2ChatMessage], Field(min_length=1)]
    maxTokens: Annotated[int, Field(ge=0, le=LIMITS.max_tokens), Truncate] = 300
