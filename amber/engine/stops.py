"""When a sample ends, and the completion it hands back: maxTokens, end-of-text, stop sequences.

Stop sequences are text, so this is the one engine module that decodes: it appends each token's
bytes and looks for a stop sequence completed by the newest token.
"""
from __future__ import annotations

from amber.engine.sequence import Sample, length_finish
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import CompletionOutput, FinishKind, FinishReason, SamplingParams


def check_finish(params: SamplingParams, sample: Sample, tokenizer: Tokenizer) -> None:
    """Set sample.finish if its newest token ended it."""
    token = sample.tokens[-1].token_id
    generated = len(sample.tokens)
    may_stop = generated >= params.min_tokens
    if token in tokenizer.eos_ids and may_stop:
        sample.finish = FinishReason(FinishKind.END_OF_TEXT)
        return
    previous_bytes = len(sample.text_bytes)
    sample.text_bytes += tokenizer.token_bytes(token)
    if may_stop and params.stop_sequences:  # decoding costs O(length): only when stops are asked for
        previous_chars = len(sample.text_bytes[:previous_bytes].decode("utf-8", errors="replace"))
        text = sample.text_bytes.decode("utf-8", errors="replace")
        match = first_stop(text, previous_chars, params.stop_sequences)
        if match is not None:
            sample.cut_at, sequence = match
            sample.finish = FinishReason(FinishKind.STOP, sequence=sequence)
            return
    if generated >= params.max_tokens:
        sample.finish = length_finish(params.max_tokens)


def first_stop(text: str, previous_chars: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest stop sequence completed by text added after `previous_chars`, as (start, seq)."""
    best = None
    for seq in stops:
        start = text.find(seq, max(0, previous_chars - len(seq) + 1))
        if start != -1 and (best is None or start < best[0]):
            best = (start, seq)
    return best


def completion_output(sample: Sample, tokenizer: Tokenizer) -> CompletionOutput:
    tokens = sample.tokens
    text_ids = [t.token_id for t in tokens]
    if sample.finish.kind is FinishKind.END_OF_TEXT:
        text_ids = text_ids[:-1]
    text = tokenizer.decode(text_ids)
    if sample.cut_at is not None:
        # Keep the tokens that begin before the stop sequence; the text ends where it starts.
        text = text[:sample.cut_at]
        starts = [start for start, _ in tokenizer.offsets(text_ids)]
        tokens = [t for t, start in zip(tokens, starts) if start < sample.cut_at]
    return CompletionOutput(sample.index, tokens, text, sample.finish)


def settled_length(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """How much of a growing `text` no stop sequence can cut any more: it ends where a complete
    stop sequence begins, or where a suffix that may grow into one begins. A stream sends that
    much and holds the rest until the next token (or the finish) settles it. `text[:start]` is
    known to be settled already."""
    settled = len(text)
    for seq in stops:
        found = text.find(seq, start)
        if found != -1:
            settled = min(settled, found)
        for k in range(min(len(seq) - 1, len(text) - start), 0, -1):  # longest partial match first
            if text.endswith(seq[:k]):
                settled = min(settled, len(text) - k)
                break
    return settled
