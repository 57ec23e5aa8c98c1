"""Streamed generations: the engine's token events as text deltas per choice, framed as SSE.

Both chat APIs and /v1/completions stream through here. A delta never splits a UTF-8 character
(a token's bytes wait in an incremental decoder until their character is whole) and never shows
text that a stop sequence may still cut (it waits until a later token or the finish settles it).
The finish hands over the rest of the engine's own final text, so a choice's deltas always add
up to exactly the text the same request returns unstreamed. Protocol shapes are not known here:
each API turns a Delta into its own chunk.
"""
from __future__ import annotations

import codecs
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

from amber.api.generation import Event, merge
from amber.engine.stops import settled_length
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import CompletionOutput, FinishReason, GenerationRequest, RequestOutput, TokenLogprob

DONE = "data: [DONE]\n\n"


@dataclass
class Delta:
    choice: int                        # request index * n + sample index
    text: str
    tokens: list[TokenLogprob]         # the tokens behind `text` (and, at the finish, any left)
    finish: FinishReason | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0             # BOS + prompt: what the model read
    completion_tokens: int = 0
    first_token_at: float | None = field(default=None, compare=False)  # time.monotonic(), streams only
    # a stream's requests as far as they got, for one cut short (its client hung up): every
    # request's prompt once its first event arrived, and each token generated before the cut
    streamed: list[int] = field(default_factory=lambda: [0, 0], compare=False)
    failed: bool = field(default=False, compare=False)  # a stream that ended in an error event

    def add(self, prompt_ids: tuple[int, ...], out: RequestOutput) -> None:
        """Count a finished request: its prompt once, every completion's tokens."""
        self.prompt_tokens += 1 + len(prompt_ids)
        self.completion_tokens += sum(len(c.tokens) for c in out.completions)

    def billed(self) -> tuple[int, int]:
        """(prompt, completion) tokens to record: what `usage` says once every request finished,
        what a stream had read and generated when it was cut short."""
        return max(self.prompt_tokens, self.streamed[0]), max(self.completion_tokens, self.streamed[1])

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class TextStream:
    """One sample's text as its tokens arrive."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self._tokenizer, self._stops = tokenizer, stops
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""                                    # whole characters decoded so far
        self._sent = 0                                     # characters already handed out
        self._pending: list[tuple[int, TokenLogprob]] = []  # (first character, token), not handed out
        self._released = 0                                 # tokens handed out

    def push(self, token: TokenLogprob) -> None:
        self._pending.append((len(self._text), token))
        if token.token_id not in self._tokenizer.eos_ids:  # end-of-text adds no text
            self._text += self._decoder.decode(self._tokenizer.token_bytes(token.token_id))

    def take(self) -> tuple[str, list[TokenLogprob]]:
        """New settled text, and the tokens it starts in; ("", []) while nothing is settled."""
        settled = settled_length(self._text, self._stops, self._sent) if self._stops else len(self._text)
        if settled <= self._sent:
            return "", []
        text, self._sent = self._text[self._sent:settled], settled
        tokens = [t for start, t in self._pending if start < settled]
        self._pending = self._pending[len(tokens):]
        self._released += len(tokens)
        return text, tokens

    def finish(self, completion: CompletionOutput) -> tuple[str, list[TokenLogprob]]:
        """What is left of the engine's final text (cut at a stop sequence) and tokens."""
        return completion.text[self._sent:], completion.tokens[self._released:]


async def deltas(streams: list[AsyncIterator[Event]], requests: list[GenerationRequest],
                 tokenizer: Tokenizer, usage: Usage) -> AsyncIterator[Delta]:
    """Deltas of every choice of every request, as the engine steps; fills `usage` as requests end."""
    n = requests[0].params.num_results
    texts = [[TextStream(tokenizer, r.params.stop_sequences) for _ in range(n)] for r in requests]
    begun: set[int] = set()
    async for i, event in merge(streams):
        usage.first_token_at = usage.first_token_at or time.monotonic()
        if i not in begun:  # its prompt has been read
            begun.add(i)
            usage.streamed[0] += 1 + len(requests[i].prompt_ids)
        if isinstance(event, RequestOutput):
            usage.add(requests[i].prompt_ids, event)
            for c in event.completions:
                text, tokens = texts[i][c.index].finish(c)
                yield Delta(i * n + c.index, text, tokens, c.finish)
            continue
        usage.streamed[1] += len(event)
        for index, token in event:
            texts[i][index].push(token)
        for index in dict.fromkeys(index for index, _ in event):
            text, tokens = texts[i][index].take()
            if text:
                yield Delta(i * n + index, text, tokens)


def sse(payload: dict) -> str:
    """One server-sent event: a single `data: ` line (the ai21 SDK rejects any other kind)."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_events(chunks: AsyncIterator[dict], usage: Usage) -> AsyncIterator[str]:
    """Chunks as SSE, then `[DONE]`. A failure after the response has started can only be told in
    the stream: an `error` event (which the openai SDK raises as an APIError), and no `[DONE]`;
    `usage.failed` tells the meter, which would otherwise see a 200 that ended."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except Exception as exc:
        usage.failed = True
        yield sse({"error": {"message": f"generation failed: {exc}", "type": "server_error",
                             "param": None, "code": None}})
        return
    yield DONE


def event_stream(chunks: AsyncIterator[dict], usage: Usage) -> StreamingResponse:
    return StreamingResponse(sse_events(chunks, usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
