"""Golden answers of the pure wire-format conversions for chat and the OpenAI API: what a finished
request or a streamed delta becomes, with the real tokenizer."""
from __future__ import annotations

import pytest

from amber.api.ai21 import chat_convert as cc
from amber.api.openai import convert as oc
from amber.api.openai import schemas as os_
from amber.api.streaming import Delta, Usage
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import CompletionOutput, FinishKind, FinishReason, RequestOutput, TokenLogprob

EOS = 2
STOP = FinishReason(FinishKind.END_OF_TEXT)


@pytest.fixture(scope="module")
def tok(default_checkpoint) -> Tokenizer:
    return Tokenizer.from_pretrained(default_checkpoint)


def token(tok: Tokenizer, text: str, lp: float, raw: float, top=()) -> TokenLogprob:
    (i,) = tok.encode(text)
    return TokenLogprob(i, lp, raw, top)


def test_openai_chat_choices(tok):
    paris, dot = token(tok, " Paris", -0.5, -0.3), token(tok, ".", -0.1, -0.2)
    alt = tok.encode(" Rome")[0]
    paris = TokenLogprob(paris.token_id, -0.5, -0.3, ((paris.token_id, -0.3), (alt, -2.0)))
    out = RequestOutput("r", [], [CompletionOutput(0, [paris, dot, TokenLogprob(EOS, -0.01, -0.02)], " Paris.", STOP)])
    usage = Usage()
    choices = oc.chat_choices(out, (5, 6, 7), True, tok, usage)
    assert choices == [{
        "index": 0, "message": {"role": "assistant", "content": " Paris."}, "finish_reason": "stop",
        "logprobs": {"content": [  # the model's own logprobs; end-of-text listed too, with no text
            {"token": " Paris", "logprob": -0.3, "bytes": list(b" Paris"),
             "top_logprobs": [{"token": " Paris", "logprob": -0.3, "bytes": list(b" Paris")},
                              {"token": " Rome", "logprob": -2.0, "bytes": list(b" Rome")}]},
            {"token": ".", "logprob": -0.2, "bytes": [46], "top_logprobs": []},
            {"token": "", "logprob": -0.02, "bytes": [], "top_logprobs": []}]}}]
    assert usage.as_dict() == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_token_text_of_a_split_character(tok):
    ids = tok.encode("🌊")
    assert len(ids) > 1
    assert all(oc.token_text(i, tok).startswith("bytes:\\x") for i in ids)
    assert "".join(oc.token_text(i, tok) for i in tok.encode("naïve")) == "naïve"


def test_openai_completion_choices_with_echo(tok):
    body = os_.CompletionRequest(model="m", prompt="Hello", max_tokens=2, logprobs=1, echo=True)
    prompt = oc.prompts(body.prompt, tok)
    (hello,) = prompt[0][1]
    world, bang = token(tok, " world", -1.0, -1.5), token(tok, "!", -0.5, -0.7)
    world = TokenLogprob(world.token_id, -1.0, -1.5, ((bang.token_id, -0.9),))
    out = RequestOutput("r", [TokenLogprob(hello, -3.0, -3.0)],
                        [CompletionOutput(0, [world, bang], " world!", FinishReason(FinishKind.LENGTH, length=2))])
    (choice,) = oc.completion_choices([out], prompt, body, tok, Usage())
    assert choice == {"index": 0, "text": "Hello world!", "finish_reason": "length", "logprobs": {
        "tokens": ["Hello", " world", "!"], "token_logprobs": [-3.0, -1.5, -0.7],
        "top_logprobs": [{"Hello": -3.0}, {"!": -0.9, " world": -1.5}, {"!": -0.7}],  # the k best and the chosen
        "text_offset": [0, 5, 11]}}


def test_openai_completion_lists_a_generated_end_of_text(tok):
    """lm-eval's loglikelihood request: token ids, max_tokens 1, echo, logprobs 1; it reads
    token_logprobs[ctxlen:-1], so the generated token must be last even when it is end-of-text."""
    ids = tok.encode("The end")
    body = os_.CompletionRequest(model="m", prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0)
    prompt = oc.prompts(body.prompt, tok)
    scored = [TokenLogprob(i, -1.0 - k, -1.0 - k) for k, i in enumerate(ids)]
    eos = TokenLogprob(EOS, -0.25, -0.5, ((EOS, -0.5),))
    out = RequestOutput("r", scored, [CompletionOutput(0, [eos], "", STOP)])
    (choice,) = oc.completion_choices([out], prompt, body, tok, Usage())
    logprobs = choice["logprobs"]
    assert choice["text"] == "The end" and choice["finish_reason"] == "stop"
    assert logprobs["tokens"] == ["The", " end", ""]
    assert logprobs["token_logprobs"] == [-1.0, -2.0, -0.5]
    assert logprobs["top_logprobs"][-1] == {"": -0.5}
    assert logprobs["text_offset"] == [0, 3, 7]


def test_openai_stream_delta_of_the_last_chunk(tok):
    d = Delta(1, "", [], FinishReason(FinishKind.STOP, sequence="\n"))
    assert oc.chat_delta_choice(d, tok, False) == {"index": 1, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    d = Delta(0, " Pa", [token(tok, " Pa", -1, -1)])
    assert oc.chat_delta_choice(d, tok, False)["delta"] == {"content": " Pa"}


def test_jamba_chunks():
    usage = Usage(10, 3)
    assert cc.jamba_chunk("c", {"role": "assistant"}) == {
        "id": "c", "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}],
        "usage": None}
    last = cc.jamba_delta_chunk("c", Delta(0, "!", [], FinishReason(FinishKind.LENGTH, length=3)), usage)
    assert last["choices"][0] == {"index": 0, "delta": {"content": "!"}, "logprobs": None, "finish_reason": "length"}
    assert last["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}


def test_j2_chat_response():
    out = RequestOutput("r", [], [CompletionOutput(0, [], "Rome.", FinishReason(FinishKind.STOP, sequence="\n"))])
    assert cc.j2_response("id", out) == {"id": "id", "outputs": [
        {"text": "Rome.", "role": "assistant", "finishReason": {"reason": "stop", "sequence": "\n"}}]}
