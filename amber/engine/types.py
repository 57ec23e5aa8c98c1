"""The contract between the API and the engine: plain dataclasses, token ids only.

No pydantic model, ORM row or HTTP notion crosses into the engine; the API converts at its edge.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Category(enum.IntEnum):
    """Token categories a penalty can exempt (AI21's applyTo* flags)."""
    WHITESPACE = 0
    PUNCTUATION = 1
    NUMBER = 2
    STOPWORD = 3
    EMOJI = 4


@dataclass(frozen=True)
class Penalty:
    """One AI21 penalty. A token in a category whose flag is False is exempt from it."""
    scale: float = 0.0
    apply_to: tuple[bool, bool, bool, bool, bool] = (True, True, True, True, True)  # by Category

    @property
    def active(self) -> bool:
        return self.scale != 0.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7          # 0 (or under sampling.MIN_TEMPERATURE) means argmax
    top_p: float = 1.0                # 0 keeps only the most likely token
    max_tokens: int = 16              # 0 scores the prompt and generates nothing
    min_tokens: int = 0               # end-of-text and stop sequences are ignored before this
    num_results: int = 1
    top_k_return: int = 0             # alternatives reported per token, 0..10
    stop_sequences: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, value added to its logit)
    frequency_penalty: Penalty = Penalty()
    presence_penalty: Penalty = Penalty()
    count_penalty: Penalty = Penalty()
    seed: int | None = None           # a seeded request samples the same tokens whatever shares the batch
    penalize_prompt: bool = True      # penalties count prompt tokens too (AI21); False: generated only (OpenAI)
    top_from_raw: bool = False        # top_k_return alternatives from the model's own distribution
                                      # (OpenAI) rather than the one sampled from (AI21)


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter for the engine to apply: `key` names it in caches, `path` is its PEFT dir."""
    key: str
    path: str


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    score_prompt: bool = True         # logprobs for every prompt token
    adapter: AdapterRef | None = None  # a custom model's adapter on this base; None: the base itself


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float                    # under the distribution actually sampled from
    raw_logprob: float                # under the model's own distribution
    top: tuple[tuple[int, float], ...] = ()   # top_k_return alternatives, (id, logprob), best first


class FinishKind(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    END_OF_TEXT = "endoftext"
    ABORTED = "aborted"


@dataclass(frozen=True)
class FinishReason:
    kind: FinishKind
    length: int | None = None         # for LENGTH: the maxTokens that was reached
    sequence: str | None = None       # for STOP: the stop sequence that matched


@dataclass
class CompletionOutput:
    index: int
    tokens: list[TokenLogprob] = field(default_factory=list)
    text: str = ""                    # decoded completion, cut before a matched stop sequence
    finish: FinishReason | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: list[TokenLogprob]
    completions: list[CompletionOutput]
