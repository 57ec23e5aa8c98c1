"""AI21 chat wire formats <-> engine types. Pure functions; the chat routes only call these.

Jamba chat responses: `{id, choices[{index, message, finish_reason, logprobs}], usage}`; streamed,
a role delta, content deltas, and the last chunk carrying `finish_reason` and `usage`. Jamba's
finish reasons are "stop" (end of text or a stop sequence) and "length". The Jamba API has no
logprobs parameter, so `logprobs` is always null. J2 chat answers `{id, outputs[{text, role,
finishReason}]}` with J2's finish reasons.
"""
from __future__ import annotations

from amber.api.ai21 import chat_schemas as cs
from amber.api.ai21.convert import finish_reason as j2_finish_reason
from amber.api.errors import invalid
from amber.api.streaming import Delta, Usage
from amber.engine.types import FinishKind, FinishReason, RequestOutput, SamplingParams


def refuse_unsupported(body: cs.ChatCompletionsRequest) -> None:
    if body.tools:
        raise invalid(("body", "tools"), "tools are not supported")
    if body.documents:
        raise invalid(("body", "documents"), "documents are not supported")
    if body.response_format is not None and body.response_format.type != "text":
        raise invalid(("body", "response_format"), 'only response_format {"type": "text"} is supported')
    if body.stream and body.n != 1:
        raise invalid(("body", "n"), "n must be 1 when stream is true")


def jamba_messages(body: cs.ChatCompletionsRequest) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content or ""} for m in body.messages]


def jamba_params(body: cs.ChatCompletionsRequest, max_tokens: int) -> SamplingParams:
    stop = body.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not seq for seq in stops):
        raise invalid(("body", "stop"), "stop sequences must not be empty")
    return SamplingParams(temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens,
                          num_results=body.n, stop_sequences=stops, seed=body.seed)


def jamba_finish(f: FinishReason | None) -> str | None:
    if f is None:
        return None
    return "length" if f.kind is FinishKind.LENGTH else "stop"


def jamba_response(rid: str, out: RequestOutput, usage: Usage) -> dict:
    return {"id": rid, "choices": [
        {"index": c.index, "message": {"role": "assistant", "content": c.text, "tool_calls": None},
         "logprobs": None, "finish_reason": jamba_finish(c.finish)} for c in out.completions],
        "usage": usage.as_dict()}


def jamba_chunk(rid: str, delta: dict, finish: FinishReason | None = None, usage: Usage | None = None) -> dict:
    return {"id": rid, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                    "finish_reason": jamba_finish(finish)}],
            "usage": usage.as_dict() if usage is not None else None}


def jamba_delta_chunk(rid: str, d: Delta, usage: Usage) -> dict:
    """A content delta; the last one (which has the finish) also carries usage."""
    return jamba_chunk(rid, {"content": d.text}, d.finish, usage if d.finish is not None else None)


def j2_messages(body: cs.J2ChatRequest) -> list[dict[str, str]]:
    system = [{"role": "system", "content": body.system}] if body.system else []
    return system + [{"role": m.role, "content": m.text} for m in body.messages]


def j2_response(rid: str, out: RequestOutput) -> dict:
    return {"id": rid, "outputs": [{"text": c.text, "role": "assistant", "finishReason": j2_finish_reason(c.finish)}
                                   for c in out.completions]}
