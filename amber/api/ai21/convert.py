"""J2 wire format <-> engine types. Pure functions; the routes only call these.

The engine speaks token ids; here ids become SentencePiece-style strings (`▁`, `<|newline|>`) and
character ranges, and the J2 penalty/bias spelling becomes engine parameters.
"""
from __future__ import annotations

from amber.api.ai21 import schemas as s
from amber.api.ai21.token_strings import TokenStrings, token_strings
from amber.api.errors import invalid
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import (CompletionOutput, FinishKind, FinishReason, Penalty, RequestOutput,
                                SamplingParams, TokenLogprob)


def penalty(p: s.PenaltyIn | None) -> Penalty:
    if p is None:
        return Penalty()
    return Penalty(p.scale, p.flags())


def logit_bias(bias: dict[str, float] | None, tokenizer: Tokenizer) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    out, strings = [], token_strings(tokenizer)
    for token, value in bias.items():
        token_id = strings.token_id(token)
        if token_id is None:
            raise invalid(("body", "logitBias", token),
                          f"{token!r} is not a token of this model's vocabulary (use /tokenize to see tokens)")
        out.append((token_id, value))
    return tuple(out)


def sampling_params(req: s.CompleteRequest, tokenizer: Tokenizer) -> SamplingParams:
    return SamplingParams(
        temperature=req.temperature, top_p=req.topP, max_tokens=req.maxTokens, min_tokens=req.minTokens,
        num_results=req.numResults, top_k_return=req.topKReturn,
        stop_sequences=tuple(req.stopSequences or ()),
        logit_bias=logit_bias(req.logitBias, tokenizer),
        frequency_penalty=penalty(req.frequencyPenalty), presence_penalty=penalty(req.presencePenalty),
        count_penalty=penalty(req.countPenalty))


def finish_reason(f: FinishReason) -> dict:
    if f.kind is FinishKind.LENGTH:
        return {"reason": "length", "length": f.length}
    if f.kind is FinishKind.STOP:
        return {"reason": "stop", "sequence": f.sequence}
    return {"reason": f.kind.value}


def token_data(t: TokenLogprob, text_range: tuple[int, int], strings: TokenStrings, top_k: int) -> s.TokenData:
    return s.TokenData(
        generatedToken=s.GeneratedToken(token=strings.string(t.token_id),
                                        logprob=t.logprob, raw_logprob=t.raw_logprob),
        topTokens=[s.TopToken(token=strings.string(i), logprob=lp) for i, lp in t.top] if top_k else None,
        textRange=s.TextRange(start=text_range[0], end=text_range[1]))


def completion(c: CompletionOutput, tokenizer: Tokenizer, top_k: int) -> s.Completion:
    ids = [t.token_id for t in c.tokens]
    if c.finish.kind is FinishKind.END_OF_TEXT:
        ids = ids[:-1]  # the end-of-text token adds no text; it sits, empty, at the end
    ranges = tokenizer.offsets(ids) + [(len(c.text), len(c.text))] * (len(c.tokens) - len(ids))
    ranges = [(min(a, len(c.text)), min(b, len(c.text))) for a, b in ranges]  # clipped at a stop cut
    strings = token_strings(tokenizer)
    return s.Completion(
        data=s.CompletionData(text=c.text, tokens=[token_data(t, r, strings, top_k)
                                                   for t, r in zip(c.tokens, ranges)]),
        finishReason=finish_reason(c.finish))


def complete_response(out: RequestOutput, prompt: str, prompt_ranges: list[tuple[int, int]],
                      tokenizer: Tokenizer, top_k: int) -> s.CompleteResponse:
    strings = token_strings(tokenizer)
    return s.CompleteResponse(
        id=out.request_id,
        prompt=s.Prompt(text=prompt, tokens=[token_data(t, r, strings, top_k)
                                             for t, r in zip(out.prompt, prompt_ranges)]),
        completions=[completion(c, tokenizer, top_k) for c in out.completions])


def token_pieces(text: str, tokenizer: Tokenizer) -> list[tuple[str, tuple[int, int]]]:
    """The model's tokens of `text`, spelled AI21's way, with each one's character range."""
    ids, ranges = tokenizer.encode_with_offsets(text)
    strings = token_strings(tokenizer)
    return [(strings.string(i), r) for i, r in zip(ids, ranges)]


def tokenize_response(text: str, pieces: list[tuple[str, tuple[int, int]]]) -> s.TokenizeResponse:
    return s.TokenizeResponse(text=text, tokens=[
        s.TokenizeToken(token=tok, textRange=s.TextRange(start=a, end=b)) for tok, (a, b) in pieces])
