"""Per-request and per-sample state while a request is in the engine. Plain Python, no torch ops."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from amber.engine.types import (CompletionOutput, FinishKind, FinishReason, GenerationRequest,
                                RequestOutput, TokenLogprob)


@dataclass(eq=False)
class Sample:
    """One of a request's numResults completions, decoding in its own cache slot."""
    index: int
    slot: int                        # -1 when not in the batch
    length: int                      # tokens in the slot: BOS + prompt + generated
    counts: torch.Tensor             # (vocab,) occurrences in prompt + completion, for penalties
    generator: torch.Generator
    tokens: list[TokenLogprob] = field(default_factory=list)
    text_bytes: bytearray = field(default_factory=bytearray)
    finish: FinishReason | None = None
    cut_at: int | None = None        # char index where a stop sequence begins
    owner: "RequestState | None" = None

    @property
    def last_token(self) -> int:
        return self.tokens[-1].token_id


@dataclass(eq=False)
class RequestState:
    request: GenerationRequest
    on_done: Callable[[RequestOutput | BaseException], None]
    on_tokens: Callable[[list[tuple[int, TokenLogprob]]], None] | None = None  # (sample index, token) per step
    penalty_masks: torch.Tensor | None = None   # (3, vocab) presence, count, frequency
    bias: torch.Tensor | None = None            # (vocab,)
    prompt: list[TokenLogprob] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    aborted: bool = False
    ids: list[int] | None = None                # BOS + prompt, set when prefill starts
    filled: int = 0                             # prompt positions already in the staging slot
    cached_logits: torch.Tensor | None = None   # the prompt was kept whole: the logits after it
    adapter_slot: int = 0                       # its adapter's lane in AdapterSlots, 0 for none
    adapter_error: Exception | None = None      # its adapter could not be read
    prefill_slot: int = -1                      # the slot its prompt is prefilled in, until its samples sit
    resuming: list[Sample] | None = None        # preempted: the samples whose cache is to be recomputed
    resume_ids: list[int] | None = None         # the sample being recomputed: BOS + prompt + its tokens

    @property
    def rows_needed(self) -> int:
        """Batch rows it takes once running."""
        return len(self.resuming) if self.resuming is not None else self.request.params.num_results

    @property
    def finished(self) -> bool:
        return bool(self.samples) and all(s.finish is not None for s in self.samples)

    def output(self, completions: list[CompletionOutput]) -> RequestOutput:
        return RequestOutput(self.request.request_id, self.prompt, completions)


def length_finish(max_tokens: int) -> FinishReason:
    return FinishReason(FinishKind.LENGTH, length=max_tokens)
