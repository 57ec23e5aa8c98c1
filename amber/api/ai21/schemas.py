"""AI21 Studio J2 wire format (camelCase), as pydantic models. Validation only, no behaviour.

Tolerates what the official SDK sends (`model`, `customModel`, `epoch` in the body; floats where
ints are meant; `applyToPunctuation` singular) and rejects everything else with a 422 naming the field.
"""
from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from amber.config import Limits

LIMITS = Limits()


def _int_from_number(value: Any) -> Any:
    """AI21 accepted 0.2 for topKReturn: a finite float where an int is meant is truncated."""
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return value


# Written after a field's bounds (`Annotated[int, Field(ge=1), Truncate]`): the bounds then stay on
# the int and its JSON Schema says `minimum`/`maximum`. Before them, pydantic checks the bounds from
# outside the validator and documents them as non-standard `ge`/`le` keys, which no tool reads.
Truncate = BeforeValidator(_int_from_number)
Int = Annotated[int, Truncate]


def _flag(*names: str):
    """A penalty flag: absent or null means true. The 2.x SDK sends its pydantic field names
    (snake_case, nulls included) rather than the camelCase aliases, so every spelling is accepted."""
    return Field(None, validation_alias=AliasChoices(*names))


class PenaltyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: Annotated[float, Field(ge=0, le=500, allow_inf_nan=False)]
    applyToWhitespaces: bool | None = _flag("applyToWhitespaces", "apply_to_whitespaces")
    applyToPunctuations: bool | None = _flag("applyToPunctuations", "applyToPunctuation",
                                             "apply_to_punctuations", "apply_to_punctuation")
    applyToNumbers: bool | None = _flag("applyToNumbers", "apply_to_numbers")
    applyToStopwords: bool | None = _flag("applyToStopwords", "apply_to_stopwords")
    applyToEmojis: bool | None = _flag("applyToEmojis", "apply_to_emojis")

    def flags(self) -> tuple[bool, bool, bool, bool, bool]:
        """(whitespaces, punctuations, numbers, stopwords, emojis), null read as true."""
        values = (self.applyToWhitespaces, self.applyToPunctuations, self.applyToNumbers,
                  self.applyToStopwords, self.applyToEmojis)
        return tuple(v is not False for v in values)


class CompleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Annotated[str, Field(max_length=LIMITS.max_prompt_chars)]
    numResults: Annotated[int, Field(ge=1, le=LIMITS.max_num_results), Truncate] = 1
    maxTokens: Annotated[int, Field(ge=0, le=LIMITS.max_tokens), Truncate] = 16
    minTokens: Annotated[int, Field(ge=0, le=LIMITS.max_tokens), Truncate] = 0
    temperature: Annotated[float, Field(ge=0, le=5, allow_inf_nan=False)] = 0.7
    topP: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 1.0  # 0: the most likely token only
    topKReturn: Annotated[int, Field(ge=0, le=LIMITS.max_top_k_return), Truncate] = 0
    stopSequences: Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]] | None,
                             Field(max_length=LIMITS.max_stop_sequences)] = None
    frequencyPenalty: PenaltyIn | None = None
    presencePenalty: PenaltyIn | None = None
    countPenalty: PenaltyIn | None = None
    logitBias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    # Sent by the SDK; the path decides the model, and epoch means nothing for a general model.
    model: str | None = None
    customModel: str | None = None
    epoch: Int | None = None

    @field_validator("minTokens")
    @classmethod
    def _min_not_above_max(cls, v: int, info) -> int:
        max_tokens = info.data.get("maxTokens")
        if max_tokens is not None and v > max_tokens:
            raise ValueError(f"minTokens ({v}) must not exceed maxTokens ({max_tokens})")
        return v


class TextRange(BaseModel):
    start: int
    end: int


class GeneratedToken(BaseModel):
    token: str
    logprob: float
    raw_logprob: float


class TopToken(BaseModel):
    token: str
    logprob: float


class TokenData(BaseModel):
    generatedToken: GeneratedToken
    topTokens: list[TopToken] | None
    textRange: TextRange


class Prompt(BaseModel):
    text: str
    tokens: list[TokenData]


class CompletionData(BaseModel):
    text: str
    tokens: list[TokenData]


class Completion(BaseModel):
    data: CompletionData
    finishReason: dict[str, Any]


class CompleteResponse(BaseModel):
    id: str
    prompt: Prompt
    completions: list[Completion]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Annotated[str, Field(max_length=LIMITS.max_prompt_chars)]
    model: str | None = None
    tokenizer: str | None = Field(None, description='"j2" for AI21\'s own J2 tokenizer')

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, v: str | None) -> str | None:
        if v not in (None, "j2"):
            raise ValueError('tokenizer must be "j2" or omitted (the model\'s own tokenizer)')
        return v


class TokenizeToken(BaseModel):
    token: str
    textRange: TextRange


class TokenizeResponse(BaseModel):
    tokens: list[TokenizeToken]
    text: str
