"""OpenAI wire format <-> engine types. Pure functions; the routes only call these.

OpenAI's semantics, where they differ from AI21's: penalties count generated tokens only
(`frequency_penalty` subtracts value x count, `presence_penalty` value once); logprobs are the
model's own distribution (temperature, top-p and penalties do not change them) and so are the
alternatives; `logit_bias` keys are token ids; a token's text is its decoded bytes, or
`bytes:\\xNN` where they are not whole UTF-8. Every generated token is listed in logprobs, the
end-of-text token included (with empty text, its logprob and its alternatives), as OpenAI's
legacy completions did: lm-evaluation-harness reads `token_logprobs[ctxlen:-1]` and relies on the
generated token being last.
"""
from __future__ import annotations

from amber.api.openai import schemas as s
from amber.api.openai.errors import invalid
from amber.api.streaming import Delta, Usage
from amber.api.models import ModelInfo
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import FinishKind, FinishReason, Penalty, RequestOutput, SamplingParams, TokenLogprob

Prompt = tuple[str, list[int], list[tuple[int, int]]]  # text, ids, each id's character range


def refuse_unsupported(body: s.CompletionRequest | s.ChatCompletionRequest) -> None:
    if isinstance(body, s.CompletionRequest):
        if body.suffix:
            raise invalid("suffix", "suffix is not supported: Amber's models only continue a prompt, "
                                    "they do not fill in between a prompt and a suffix")
        if body.best_of not in (None, body.n):
            raise invalid("best_of", "best_of is not supported (only best_of equal to n)")
        if body.stream and body.echo and body.logprobs is not None:
            raise invalid("echo", "echo with logprobs cannot be streamed (prompt logprobs come with the "
                                  "finished request): leave out stream, echo or logprobs")
        return
    if body.top_logprobs and not body.logprobs:
        raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
    if body.tools or body.functions:
        raise invalid("tools", "tools and function calling are not supported")
    if body.response_format is not None and body.response_format.type != "text":
        raise invalid("response_format", f"response_format {body.response_format.type!r} is not supported "
                                         "(only \"text\")")


def stop_sequences(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not seq for seq in stops):
        raise invalid("stop", "stop sequences must not be empty")
    return stops


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise invalid("logit_bias", f"logit_bias keys are token ids (0..{vocab_size - 1}); got {key!r}")
        out.append((int(key), value))
    return tuple(out)


def sampling_params(body: s.CompletionRequest | s.ChatCompletionRequest, tokenizer: Tokenizer, *,
                    max_tokens: int, top_k: int) -> SamplingParams:
    return SamplingParams(
        temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens,
        num_results=body.n, top_k_return=top_k, stop_sequences=stop_sequences(body.stop),
        logit_bias=logit_bias(body.logit_bias, tokenizer.vocab_size),
        presence_penalty=Penalty(body.presence_penalty), count_penalty=Penalty(body.frequency_penalty),
        seed=body.seed, penalize_prompt=False, top_from_raw=True)


def prompts(prompt: str | list, tokenizer: Tokenizer) -> list[Prompt]:
    """Each prompt as (text, ids, character range of each id): strings are encoded, token-id
    lists decoded."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise invalid("prompt", "prompt must not be an empty list")
    if len(prompt) > s.LIMITS.max_prompts:
        raise invalid("prompt", f"at most {s.LIMITS.max_prompts} prompts per request (got {len(prompt)}); "
                                "send the rest in further requests")
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids, ranges = tokenizer.encode_with_offsets(p)
            out.append((p, ids, ranges))
            continue
        if any(not 0 <= i < tokenizer.vocab_size for i in p):
            raise invalid("prompt", f"token ids must lie in 0..{tokenizer.vocab_size - 1}")
        out.append((tokenizer.decode(p), list(p), tokenizer.offsets(p)))
    return out


def finish_reason(f: FinishReason | None) -> str | None:
    if f is None:
        return None
    return "length" if f.kind is FinishKind.LENGTH else "stop"


def token_text(token_id: int, tokenizer: Tokenizer) -> str:
    data = _token_bytes(token_id, tokenizer)
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _token_bytes(token_id: int, tokenizer: Tokenizer) -> bytes:
    """A token's bytes in the text; end-of-text adds none."""
    return b"" if token_id in tokenizer.eos_ids else tokenizer.token_bytes(token_id)


# ---- /v1/completions ----
def completion_logprobs(tokens: list[TokenLogprob], offsets: list[int], tokenizer: Tokenizer) -> dict:
    """Legacy logprobs: the chosen token's logprob, and the top alternatives plus the chosen one."""
    return {
        "tokens": [token_text(t.token_id, tokenizer) for t in tokens],
        "token_logprobs": [t.raw_logprob for t in tokens],
        "top_logprobs": [{token_text(i, tokenizer): lp for i, lp in (*t.top, (t.token_id, t.raw_logprob))}
                         for t in tokens],
        "text_offset": offsets,
    }


def token_offsets(tokens: list[TokenLogprob], text_len: int, tokenizer: Tokenizer, base: int) -> list[int]:
    """Where each token starts in a text of `text_len` characters that begins at `base`."""
    return [base + min(start, text_len) for start, _ in tokenizer.offsets([t.token_id for t in tokens])]


def completion_choices(outputs: list[RequestOutput], prompts: list[Prompt], body: s.CompletionRequest,
                       tokenizer: Tokenizer, usage: Usage) -> list[dict]:
    """Choices of finished requests, prompt i's sample j at index i * n + j; fills `usage`."""
    choices = []
    for i, (out, (text, ids, ranges)) in enumerate(zip(outputs, prompts)):
        usage.add(tuple(ids), out)
        head = text if body.echo else ""
        for c in out.completions:
            logprobs = None
            if body.logprobs is not None:
                tokens = c.tokens
                offsets = token_offsets(tokens, len(c.text), tokenizer, len(head))
                if body.echo:
                    tokens, offsets = out.prompt + tokens, [start for start, _ in ranges] + offsets
                logprobs = completion_logprobs(tokens, offsets, tokenizer)
            choices.append(completion_choice(i * body.n + c.index, head + c.text, logprobs, c.finish))
    return choices


def echo_choices(prompts: list[Prompt], n: int) -> list[dict]:
    """The first streamed chunk of an `echo` request: each choice's prompt text."""
    return [completion_choice(i * n + j, text, None, None) for i, (text, _, _) in enumerate(prompts) for j in range(n)]


def completion_delta(d: Delta, sent: int, body: s.CompletionRequest, tokenizer: Tokenizer) -> dict:
    """A streamed choice; `sent`: characters of that choice already streamed (for text_offset)."""
    logprobs = None
    if body.logprobs is not None:
        tokens = d.tokens
        logprobs = completion_logprobs(tokens, token_offsets(tokens, len(d.text), tokenizer, sent), tokenizer)
    return completion_choice(d.choice, d.text, logprobs, d.finish)


def completion_choice(index: int, text: str, logprobs: dict | None, finish: FinishReason | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(finish)}


def model_card(m: ModelInfo, created: int) -> dict:
    return {"id": m.id, "object": "model", "created": created, "owned_by": m.owned_by, "root": m.root,
            "parent": None}


def completion_body(rid: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage, "system_fingerprint": None}


# ---- /v1/chat/completions ----
def messages(body: s.ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as the chat template takes them: string content; `developer` is OpenAI's newer name
    for `system`."""
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if not isinstance(content, str):
            if any(part.type != "text" for part in content):
                raise invalid(f"messages.{i}.content", "only text content parts are supported")
            content = "".join(part.text or "" for part in content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _entry(token_id: int, logprob: float, tokenizer: Tokenizer) -> dict:
    return {"token": token_text(token_id, tokenizer), "logprob": logprob,
            "bytes": list(_token_bytes(token_id, tokenizer))}


def chat_logprobs(tokens: list[TokenLogprob], tokenizer: Tokenizer) -> dict:
    return {"content": [{**_entry(t.token_id, t.raw_logprob, tokenizer),
                         "top_logprobs": [_entry(i, lp, tokenizer) for i, lp in t.top]}
                        for t in tokens]}


def chat_choice(index: int, text: str, logprobs: dict | None, finish: FinishReason | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason(finish)}


def chat_choices(out: RequestOutput, prompt_ids: tuple[int, ...], logprobs: bool, tokenizer: Tokenizer,
                 usage: Usage) -> list[dict]:
    """Choices of a finished chat request; fills `usage`."""
    usage.add(prompt_ids, out)
    return [chat_choice(comp.index, comp.text, chat_logprobs(comp.tokens, tokenizer) if logprobs else None,
                        comp.finish) for comp in out.completions]


def chat_body(rid: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage, "system_fingerprint": None}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "usage": usage, "system_fingerprint": None}


def chat_delta_choice(d: Delta, tokenizer: Tokenizer, logprobs: bool) -> dict:
    return {"index": d.choice, "delta": {"content": d.text} if d.text or d.finish is None else {},
            "logprobs": chat_logprobs(d.tokens, tokenizer) if logprobs else None,
            "finish_reason": finish_reason(d.finish)}


def chat_role_choice(index: int) -> dict:
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None}
