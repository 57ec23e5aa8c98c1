"""J2 `complete` over a live server: response shape, token data, and behaviour of each parameter."""
from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow


def post(server, path, body, key=None):
    headers = {"Authorization": f"Bearer {key or server.key}"}
    return httpx.post(f"{server.url}/studio/v1{path}", json=body, headers=headers, timeout=120)


def test_full_response_shape_and_token_data(server):
    prompt = "Hello world!\nThe capital of France is"
    r = post(server, "/j2-light/complete", {"prompt": prompt, "maxTokens": 8, "temperature": 0, "topKReturn": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "prompt", "completions"}
    assert body["prompt"]["text"] == prompt
    tokens = body["prompt"]["tokens"]
    # ranges tile the prompt, and each token string spells its slice
    assert tokens[0]["textRange"]["start"] == 0 and tokens[-1]["textRange"]["end"] == len(prompt)
    for a, b in zip(tokens, tokens[1:]):
        assert a["textRange"]["end"] == b["textRange"]["start"]
    for t in tokens:
        g = t["generatedToken"]
        piece = prompt[t["textRange"]["start"]:t["textRange"]["end"]]
        assert g["token"] == piece.replace(" ", "▁").replace("\n", "<|newline|>")
        assert g["logprob"] == g["raw_logprob"] <= 0
        assert len(t["topTokens"]) == 3
    assert any(t["generatedToken"]["token"] == "<|newline|>" for t in tokens)
    (c,) = body["completions"]
    assert c["finishReason"] == {"reason": "length", "length": 8}
    assert len(c["data"]["tokens"]) == 8
    text = c["data"]["text"]
    assert "Paris" in text
    assert c["data"]["tokens"][-1]["textRange"]["end"] == len(text)
    for t in c["data"]["tokens"]:  # greedy: the chosen token is the top alternative
        assert t["topTokens"][0]["token"] == t["generatedToken"]["token"]


def test_greedy_is_repeatable_and_aliases_name_one_model(server):
    body = {"prompt": "Once upon a time", "maxTokens": 12, "temperature": 0}
    texts = {post(server, f"/{m}/complete", body).json()["completions"][0]["data"]["text"]
             for m in ("j2-light", "j1-large", "smollm2-135m-instruct", "j2-light")}
    assert len(texts) == 1


def test_max_tokens_zero_scores_the_prompt_only(server):
    r = post(server, "/j2-light/complete", {"prompt": "Just score me.", "maxTokens": 0})
    c = r.json()["completions"][0]
    assert c["data"] == {"text": "", "tokens": []} and c["finishReason"] == {"reason": "length", "length": 0}
    assert len(r.json()["prompt"]["tokens"]) >= 3


def test_stop_sequences_cut_and_are_named(server):
    body = {"prompt": "List: 1. apples\n2. pears\n3.", "maxTokens": 40, "temperature": 0}
    free = post(server, "/j2-light/complete", body).json()["completions"][0]["data"]["text"]
    assert "\n" in free
    c = post(server, "/j2-light/complete", {**body, "stopSequences": ["\n", "zzz"]}).json()["completions"][0]
    assert c["finishReason"] == {"reason": "stop", "sequence": "\n"}
    assert c["data"]["text"] == free[:free.index("\n")]


def test_num_results_sampling_and_penalties(server):
    body = {"prompt": "Write a word:", "maxTokens": 6, "numResults": 4, "temperature": 1.0, "topP": 0.9,
            "minTokens": 2, "topKReturn": 2,
            "frequencyPenalty": {"scale": 1.0, "applyToNumbers": False},
            "presencePenalty": {"scale": 0.5, "applyToPunctuation": False},
            "countPenalty": {"scale": 0.3, "applyToWhitespaces": False, "applyToEmojis": False}}
    r = post(server, "/j2-light/complete", body)
    assert r.status_code == 200, r.text
    comps = r.json()["completions"]
    assert len(comps) == 4
    for c in comps:
        assert len(c["data"]["tokens"]) >= 2
        for t in c["data"]["tokens"]:
            g = t["generatedToken"]
            # logprob is under the sampled distribution (top-p renormalised), never below raw - slack
            assert g["logprob"] <= 0 and g["raw_logprob"] <= 0


def test_logit_bias_by_token_string(server):
    body = {"prompt": "The capital of France is", "maxTokens": 3, "temperature": 0}
    forced = post(server, "/j2-light/complete", {**body, "logitBias": {"▁banana": 100}}).json()
    tokens = [t["generatedToken"]["token"] for t in forced["completions"][0]["data"]["tokens"]]
    assert tokens == ["▁banana"] * 3


def test_tokenize_with_the_model_and_with_j2(server):
    text = "Barack Obama was president.\nHello"
    own = post(server, "/tokenize", {"text": text}).json()
    assert own["text"] == text
    assert "".join(t["token"] for t in own["tokens"]).replace("▁", " ").replace("<|newline|>", "\n") == text
    j2 = post(server, "/tokenize", {"text": text, "tokenizer": "j2"}).json()
    pieces = [t["token"] for t in j2["tokens"]]
    assert "▁Barack▁Obama" in pieces or "Barack▁Obama" in pieces
    for t in j2["tokens"]:
        assert t["textRange"]["end"] > t["textRange"]["start"] or t["token"] == "<|newline|>"


def test_models_list(server):
    r = httpx.get(f"{server.url}/studio/v1/models", headers=server.headers)
    names = {m["name"]: m for m in r.json()["models"]}
    assert names["smollm2-135m-instruct"]["aliases"] == ["j2-light", "j1-large"]
    assert names["smollm2-135m-instruct"]["default"] is True


def test_top_p_zero_keeps_only_the_most_likely_token(server):
    """AI21's own integration tests send temperature 1 with topP 0 (14 of them) and expect an answer:
    greedy in effect, and logprob/topTokens those of a one-token nucleus."""
    body = {"prompt": "The capital of France is", "maxTokens": 6, "temperature": 0, "topKReturn": 2}
    greedy = post(server, "/j2-light/complete", body).json()["completions"][0]["data"]
    r = post(server, "/j2-light/complete", {**body, "temperature": 1, "topP": 0, "numResults": 2})
    assert r.status_code == 200, r.text
    for c in r.json()["completions"]:
        assert c["data"]["text"] == greedy["text"]
        for t in c["data"]["tokens"]:
            assert t["generatedToken"]["logprob"] == 0.0 and t["generatedToken"]["raw_logprob"] < 0
            assert [top["token"] for top in t["topTokens"]] == [t["generatedToken"]["token"]]
    chat = post(server, "/j2-light/chat", {"system": "Be brief.", "messages": [{"role": "user", "text": "Hi"}],
                                           "maxTokens": 4, "temperature": 1, "topP": 0})
    assert chat.status_code == 200, chat.text


def test_a_tiny_temperature_is_greedy(server):
    """temperature 1e-38 lies inside 0..5 and once overflowed into garbage text and null logprobs."""
    body = {"prompt": "The capital of France is", "maxTokens": 4, "temperature": 0}
    greedy = post(server, "/j2-light/complete", body).json()["completions"][0]["data"]
    tiny = post(server, "/j2-light/complete", {**body, "temperature": 1e-38}).json()["completions"][0]["data"]
    assert tiny["text"] == greedy["text"]
    assert [t["generatedToken"]["logprob"] for t in tiny["tokens"]] == \
        [t["generatedToken"]["logprob"] for t in greedy["tokens"]]
