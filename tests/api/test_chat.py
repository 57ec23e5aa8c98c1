"""AI21's chat APIs over HTTP: Jamba `chat/completions` (streamed and not) and J2 `{model}/chat`,
rendered with the model's own chat template."""
from __future__ import annotations

import httpx
import pytest

from tests.api.sse import stream_events

pytestmark = pytest.mark.slow
JAMBA = "/studio/v1/chat/completions"
MESSAGES = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", headers=server.headers, json=body, timeout=120)


def ok(server, path: str, body: dict) -> dict:
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def test_jamba_chat_shape(server):
    r = ok(server, JAMBA, {"model": "j2-light", "messages": MESSAGES, "max_tokens": 24, "temperature": 0, "n": 2})
    assert set(r) == {"id", "choices", "usage"}
    assert [c["index"] for c in r["choices"]] == [0, 1]
    c = r["choices"][0]
    assert c["message"]["role"] == "assistant" and "Paris" in c["message"]["content"]
    assert c["finish_reason"] == "stop" and c["logprobs"] is None
    assert r["choices"][1]["message"] == c["message"]  # greedy: the same answer twice
    usage = r["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_the_prompt_is_the_models_own_chat_template(server, default_checkpoint):
    """The conversation reads exactly as transformers renders it: the same prompt through J2
    complete (whose engine adds the BOS that the template starts with) answers the same."""
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(default_checkpoint).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>")
    chat = ok(server, JAMBA, {"model": "j2-light", "messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    complete = ok(server, "/studio/v1/j2-light/complete",
                  {"prompt": rendered[len("<|im_start|>"):], "maxTokens": 12, "temperature": 0})
    assert chat["choices"][0]["message"]["content"] == complete["completions"][0]["data"]["text"]
    assert chat["usage"]["prompt_tokens"] == 1 + len(complete["prompt"]["tokens"])


def test_control_tokens_in_a_message_are_plain_text(server):
    usage = lambda text: ok(server, JAMBA, {"model": "j2-light", "max_tokens": 1,
                                            "messages": [{"role": "user", "content": text}]})["usage"]["prompt_tokens"]
    assert usage("a<|im_end|>b") > usage("ab") + 1  # spelled out, not one special token


def test_jamba_stream(server):
    body = {"model": "j2-light", "messages": MESSAGES, "max_tokens": 24, "temperature": 0, "stop": ["\n\n"]}
    plain = ok(server, JAMBA, body)
    chunks = stream_events(server, JAMBA, {**body, "stream": True})
    assert all(set(c) == {"id", "choices", "usage"} and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:])
    assert text == plain["choices"][0]["message"]["content"]
    assert all(c["usage"] is None and c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == plain["usage"]


@pytest.mark.parametrize("body,status,field", [
    ({"model": "jamba-large"}, 404, None),
    ({"model": "tiny"}, 422, "model"),  # no chat template
    ({"n": 2, "stream": True}, 422, "n"),
    ({"tools": [{"type": "function"}]}, 422, "tools"),
    ({"documents": [{"content": "x"}]}, 422, "documents"),
    ({"response_format": {"type": "json_object"}}, 422, "response_format"),
    ({"temperature": 3}, 422, "temperature"),
    ({"max_tokens": 2040}, 422, "messages"),
    ({"logprobs": True}, 422, "logprobs"),  # not part of AI21's chat API
])
def test_jamba_errors_keep_ai21s_shape(server, body, status, field):
    r = post(server, JAMBA, {"model": "j2-light", "messages": MESSAGES, **body})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    if field is None:
        assert isinstance(detail, str)
    else:
        assert detail[0]["loc"][:2] == ["body", field]


def test_j2_chat(server):
    body = {"system": "You are a geography teacher.", "numResults": 2, "maxTokens": 16, "temperature": 0,
            "messages": [{"role": "user", "text": "What is the capital of France?"},
                         {"role": "assistant", "text": "Paris."},
                         {"role": "user", "text": "And of Italy?"}]}
    r = ok(server, "/studio/v1/j2-light/chat", body)
    assert set(r) == {"id", "outputs"} and len(r["outputs"]) == 2
    out = r["outputs"][0]
    assert out["role"] == "assistant" and out["text"]
    assert out["finishReason"]["reason"] in ("endoftext", "length", "stop")
    cut = ok(server, "/studio/v1/j2-light/chat", {**body, "numResults": 1, "stopSequences": [out["text"][2:4]]})
    assert cut["outputs"][0]["finishReason"] == {"reason": "stop", "sequence": out["text"][2:4]}
    assert cut["outputs"][0]["text"] == out["text"][:2]


@pytest.mark.parametrize("body,field", [
    ({"messages": [{"role": "user", "text": "x"}]}, "system"),
    ({"system": "s", "messages": []}, "messages"),
    ({"system": "s", "messages": [{"role": "system", "text": "x"}]}, "messages"),
    ({"system": "s", "messages": [{"role": "user", "text": "x"}], "maxTokens": 2, "minTokens": 5}, "minTokens"),
    ({"system": "s", "messages": [{"role": "user", "text": "x"}], "numResults": 17}, "numResults"),
])
def test_j2_chat_validation(server, body, field):
    r = post(server, "/studio/v1/j2-light/chat", body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", field]
