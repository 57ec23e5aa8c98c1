"""Every bad input answers 4xx naming the field, and the server stays up."""
from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow

GOOD = {"prompt": "Hi", "maxTokens": 1, "temperature": 0}


def post(server, path, body=None, headers=None, **kw):
    headers = {"Authorization": f"Bearer {server.key}"} if headers is None else headers
    return httpx.post(f"{server.url}/studio/v1{path}", json=body, headers=headers, timeout=60, **kw)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer"}])
def test_bad_keys_are_401(server, headers):
    for path in ("/j2-light/complete", "/tokenize"):
        r = post(server, path, GOOD | {"text": "x"}, headers=headers)
        assert r.status_code == 401, r.text
    assert httpx.get(f"{server.url}/studio/v1/models", headers=headers).status_code == 401


def test_unknown_model_is_404(server):
    r = post(server, "/no-such-model/complete", GOOD)
    assert r.status_code == 404 and "no-such-model" in r.json()["detail"]
    assert post(server, "/j2-light/nope/complete", GOOD).status_code == 404
    assert post(server, "/tokenize", {"text": "x", "model": "nope"}).status_code == 404


@pytest.mark.parametrize("field,value", [
    ("numResults", 0), ("numResults", 17), ("maxTokens", -1), ("maxTokens", 100000), ("minTokens", -2),
    ("temperature", -0.1), ("temperature", 6), ("topP", -0.1), ("topP", 1.5), ("topKReturn", 11),
    ("topKReturn", -1), ("stopSequences", [""]), ("stopSequences", "\n"), ("stopSequences", ["x"] * 17),
    ("frequencyPenalty", {"scale": -1}), ("presencePenalty", {"scale": 1, "applyToNumbres": False}),
    ("countPenalty", {"applyToNumbers": True}), ("countPenalty", 3), ("logitBias", {"▁Paris": 1000}),
    ("logitBias", {"▁Paris": "high"}), ("prompt", 42), ("prompt", None), ("maxToken", 5),
    ("temperature", "hot"), ("numResults", "many"),
])
def test_invalid_values_are_422_naming_the_field(server, field, value):
    r = post(server, "/j2-light/complete", GOOD | {field: value})
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["detail"]]
    assert any(field in loc for loc in locs), locs


def test_semantic_errors_name_the_field(server):
    r = post(server, "/j2-light/complete", GOOD | {"minTokens": 5, "maxTokens": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "minTokens"
    r = post(server, "/j2-light/complete", GOOD | {"logitBias": {"not-a-real-token-xyzzy": 1}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "logitBias", "not-a-real-token-xyzzy"]
    r = post(server, "/j2-light/complete", GOOD | {"prompt": "word " * 2100, "maxTokens": 10})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert "context" in r.json()["detail"][0]["msg"]
    r = post(server, "/tokenize", {"text": "x", "tokenizer": "gpt2"})
    assert r.status_code == 422 and "tokenizer" in r.json()["detail"][0]["loc"]


def test_malformed_bodies_are_422(server):
    h = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    for content in (b"{not json", b"[1, 2]", b"", b'{"prompt": "x", "temperature": NaN}', b"\xff\xfe"):
        r = httpx.post(f"{server.url}/studio/v1/j2-light/complete", content=content, headers=h)
        assert r.status_code == 422, (content, r.status_code, r.text)


def test_tolerated_sdk_quirks(server):
    body = GOOD | {"model": "j2-light", "customModel": None, "epoch": 3, "topKReturn": 0.2,
                   "numResults": 1.0, "countPenalty": {"scale": 0.1, "applyToPunctuation": False},
                   "presencePenalty": {"scale": 0.1, "apply_to_numbers": None, "apply_to_emojis": False}}
    assert post(server, "/j2-light/complete", body).status_code == 200


def test_more_results_than_the_kv_pool_holds_is_400_naming_them(server):
    """16 results of ~2,000 positions each exceed the default 512 MB pool: refused before anything
    runs, on both APIs, and the server serves on."""
    r = post(server, "/j2-light/complete", {"prompt": "Hi", "maxTokens": 2000, "numResults": 16})
    assert r.status_code == 400 and "numResults 16" in r.json()["detail"], r.text
    r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {server.key}"}, timeout=60,
                   json={"model": "j2-light", "prompt": "Hi", "max_tokens": 2000, "n": 16, "stream": True})
    assert r.status_code == 400 and "KV blocks" in r.text, r.text  # OpenAI's error shape
    assert post(server, "/j2-light/complete", GOOD).status_code == 200


def test_server_is_still_healthy_after_all_that(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert post(server, "/j2-light/complete", GOOD).status_code == 200
