"""The OpenAI-compatible API over HTTP against a live server: shapes, errors, exact logprobs,
seeds, and streams that add up to the unstreamed answer."""
from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from amber.engine.tokenizer import Tokenizer
from tests.api.sse import is_whole_utf8, stream_events

pytestmark = pytest.mark.slow
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def post(server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", headers=server.headers if headers is None else headers, json=body,
                      timeout=120)


def ok(server, path: str, body: dict) -> dict:
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_general_models_and_aliases(server):
    r = httpx.get(f"{server.url}/v1/models", headers=server.headers)
    assert r.status_code == 200 and r.json()["object"] == "list"
    cards = {m["id"]: m for m in r.json()["data"]}
    assert {"smollm2-135m-instruct", "j2-light", "j1-large", "tiny"} <= set(cards)
    assert cards["j2-light"]["root"] == "smollm2-135m-instruct" and cards["j2-light"]["object"] == "model"
    assert httpx.get(f"{server.url}/v1/models/j1-large", headers=server.headers).json()["id"] == "j1-large"


@pytest.mark.parametrize("method,path,headers,status,code", [
    ("GET", "/v1/models", {}, 401, "invalid_api_key"),
    ("GET", "/v1/models", {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ("GET", "/v1/models/gpt-9", None, 404, "model_not_found"),
    ("GET", "/v1/no-such-thing", None, 404, None),
])
def test_errors_take_openais_shape(server, method, path, headers, status, code):
    r = httpx.request(method, f"{server.url}{path}", headers=server.headers if headers is None else headers)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code and error["type"] == "invalid_request_error"


CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("path,body,param", [
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, "suffix"),
    (COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 11}, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "temperature": 2.5}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "n": 17}, "n"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 5000}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "stop": ["ok", ""]}, "stop.1"),
    (COMPLETIONS, {"prompt": "x", "stop": ""}, "stop"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"Paris": 5}}, "logit_bias"),
    (COMPLETIONS, {"prompt": [10, 99999999]}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "echo": True, "logprobs": 1, "stream": True}, "echo"),
    (COMPLETIONS, {"prompt": "word " * 2100}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "model": "gpt-9"}, "model"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    (CHAT, {"messages": CHAT_MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": CHAT_MESSAGES, "logprobs": True, "top_logprobs": 11}, "top_logprobs"),
    (CHAT, {"messages": CHAT_MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"messages": CHAT_MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": CHAT_MESSAGES, "max_tokens": 2040}, "messages"),
    (CHAT, {"messages": CHAT_MESSAGES, "model": "tiny"}, "model"),  # no chat template
])
def test_invalid_requests_are_400s_naming_the_field(server, path, body, param):
    r = post(server, path, {"model": "j2-light", **body})
    expected = 404 if body.get("model") == "gpt-9" else 400
    assert r.status_code == expected, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_context_overflow_says_so(server):
    error = post(server, COMPLETIONS, {"model": "j2-light", "prompt": "word " * 2100}).json()["error"]
    assert error["code"] == "context_length_exceeded" and "2048" in error["message"]


def test_ai21_errors_keep_their_shape(server):
    r = post(server, "/studio/v1/chat/completions", {"model": "gpt-9", "messages": CHAT_MESSAGES})
    assert r.status_code == 404 and "detail" in r.json()


def test_completion_logprobs_are_the_models_own(server):
    """Reported logprobs are the model's distribution whatever the temperature: they equal the
    J2 API's scores of the same text (prompt-token logprobs are the model's own)."""
    prompt = "The capital of France is"
    for temperature in (0, 0.6):
        body = {"model": "j2-light", "prompt": prompt, "max_tokens": 8, "temperature": temperature, "seed": 7,
                "logprobs": 3, "echo": True}
        choice = ok(server, COMPLETIONS, body)["choices"][0]
        lp, text = choice["logprobs"], choice["text"]
        assert text.startswith(prompt)
        scored = ok(server, "/studio/v1/j2-light/complete",
                    {"prompt": text, "maxTokens": 0, "topKReturn": 3})["prompt"]["tokens"]
        compared = 0
        for i, (token, logprob, tops) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])):
            ref = scored[i]
            if ref["generatedToken"]["token"].replace("▁", " ").replace("<|newline|>", "\n") != token:
                break  # re-tokenising the text may merge at the prompt/completion seam
            assert logprob == pytest.approx(ref["generatedToken"]["logprob"], abs=2e-3)
            alternatives = {t["token"].replace("▁", " ").replace("<|newline|>", "\n"): t["logprob"]
                            for t in ref["topTokens"]}
            if "<|im_end|>" in alternatives:  # end-of-text: no text on /v1, as where it is generated
                alternatives[""] = alternatives.pop("<|im_end|>")
            for alt, alt_lp in alternatives.items():
                assert tops[alt] == pytest.approx(alt_lp, abs=2e-3)
            compared += 1
        assert compared > len(scored) // 2
        offsets = lp["text_offset"]
        assert [text[a:b] for a, b in zip(offsets, offsets[1:] + [len(text)])] == lp["tokens"]


def test_echo_with_no_tokens_scores_the_prompt(server):
    choice = ok(server, COMPLETIONS, {"model": "j2-light", "prompt": "Hello world, again", "max_tokens": 0,
                                      "echo": True, "logprobs": 0})["choices"][0]
    assert choice["text"] == "Hello world, again" and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == 4 and all(lp < 0 for lp in choice["logprobs"]["token_logprobs"])


def test_logit_bias_by_token_id(server, default_checkpoint):
    (paris,) = Tokenizer.from_pretrained(default_checkpoint).encode(" Paris")
    body = {"model": "j2-light", "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
    assert ok(server, COMPLETIONS, body)["choices"][0]["text"] == " Paris"
    assert ok(server, COMPLETIONS, {**body, "logit_bias": {str(paris): -100}})["choices"][0]["text"] != " Paris"
    forced = ok(server, COMPLETIONS, {**body, "prompt": "Hello", "max_tokens": 3, "logit_bias": {str(paris): 100}})
    assert forced["choices"][0]["text"] == " Paris" * 3


def test_seed_reproduces_whatever_shares_the_batch(server):
    seeded = {"model": "j2-light", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0,
              "seed": 1234, "n": 2}
    texts = lambda r: [c["text"] for c in r.json()["choices"]]
    alone = texts(post(server, COMPLETIONS, seeded))
    with ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(post, server, COMPLETIONS, {"model": "j2-light", "prompt": f"Noise {i}:", "n": 2,
                                                         "max_tokens": 24, "temperature": 1.0}) for i in range(3)]
        time.sleep(0.2)  # the seeded request joins a batch already decoding
        crowd = pool.submit(post, server, COMPLETIONS, seeded)
        assert all(f.result().status_code == 200 for f in noise)
        assert texts(crowd.result()) == alone
    assert alone[0] != alone[1]  # each of n samples has its own generator
    assert texts(post(server, COMPLETIONS, {**seeded, "seed": 4321})) != alone


def test_streamed_completions_add_up_to_the_unstreamed(server):
    body = {"model": "j2-light", "prompt": ["Q: What is the capital of Italy?\nA:", "List three colours:\n1."],
            "max_tokens": 20, "temperature": 0, "n": 2, "stop": ["\n\n", "3."], "logprobs": 2}
    plain = ok(server, COMPLETIONS, body)
    chunks = stream_events(server, COMPLETIONS, {**body, "stream": True, "stream_options": {"include_usage": True}})
    texts, tokens, finish = defaultdict(str), defaultdict(list), {}
    for chunk in chunks[:-1]:
        assert chunk["object"] == "text_completion" and chunk["usage"] is None and len(chunk["choices"]) == 1
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
            tokens[c["index"]] += c["logprobs"]["tokens"]
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert len(plain["choices"]) == 4
    for c in plain["choices"]:
        assert texts[c["index"]] == c["text"] and finish[c["index"]] == c["finish_reason"]
        assert tokens[c["index"]] == c["logprobs"]["tokens"]
    assert any(c["finish_reason"] == "stop" for c in plain["choices"])


def test_stream_without_usage_ends_with_done(server):
    chunks = stream_events(server, COMPLETIONS, {"model": "j2-light", "prompt": "Hi", "max_tokens": 3, "seed": 7,
                                                 "stream": True, "echo": True})
    assert chunks[0]["choices"][0]["text"] == "Hi"  # the echo comes first
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)


def test_streamed_chat_never_splits_a_character(server):
    body = {"model": "j2-light", "messages": [{"role": "user", "content": "Write 3 emoji about the sea"}],
            "max_tokens": 12, "temperature": 0, "logprobs": True}
    plain = ok(server, CHAT, body)["choices"][0]
    pieces = [bytes(t["bytes"]) for t in plain["logprobs"]["content"]]
    assert any(not is_whole_utf8(p) for p in pieces), "this answer should hold characters split across tokens"
    chunks = stream_events(server, CHAT, {**body, "stream": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks[1:]]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == plain["message"]["content"]
    streamed = [t["token"] for c in chunks[1:] for t in (c["choices"][0]["logprobs"] or {"content": []})["content"]]
    assert streamed == [t["token"] for t in plain["logprobs"]["content"]]


def test_chat_shape_and_usage(server):
    r = ok(server, CHAT, {"model": "j1-large", "messages": [{"role": "developer", "content": "Be brief."},
                                                              *CHAT_MESSAGES], "max_tokens": 16, "temperature": 0,
                          "n": 2, "logprobs": True, "top_logprobs": 2})
    assert r["object"] == "chat.completion" and r["model"] == "j1-large" and r["id"].startswith("chatcmpl-")
    assert [c["index"] for c in r["choices"]] == [0, 1]
    c = r["choices"][0]
    assert c["message"]["role"] == "assistant" and "Paris" in c["message"]["content"]
    assert c["finish_reason"] in ("stop", "length")
    assert all(len(t["top_logprobs"]) == 2 for t in c["logprobs"]["content"])
    usage = r["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
