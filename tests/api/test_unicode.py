"""Text that is not Unicode (a lone UTF-16 surrogate, which JSON can spell as `\\ud800`) is a 4xx
naming the field on every route that takes text, never a 500, and the answer itself is valid UTF-8."""
from __future__ import annotations

import json

import httpx
import pytest

from amber.api.routing import surrogate_path, without_surrogates

pytestmark = pytest.mark.slow
LONE = "\\ud800"  # as it appears in the JSON text

AI21 = [
    ("/studio/v1/j2-light/complete", '{"prompt": "a%sb"}', ["body", "prompt"]),
    ("/studio/v1/j2-light/complete", '{"prompt": "x", "stopSequences": ["ok", "%s"]}', ["body", "stopSequences", 1]),
    ("/studio/v1/j2-light/complete", '{"prompt": "x", "logitBias": {"%s": 1}}', ["body", "logitBias", "\\ud800"]),
    ("/studio/v1/j2-light/complete", '{"prompt": 7, "model": "%s"}', ["body", "model"]),
    ("/studio/v1/j2-light/chat", '{"system": "s", "messages": [{"role": "user", "text": "%s"}]}',
     ["body", "messages", 0, "text"]),
    ("/studio/v1/chat/completions", '{"model": "j2-light", "messages": [{"role": "user", "content": "%s"}]}',
     ["body", "messages", 0, "content"]),
    ("/studio/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}',
     ["body", "model"]),
    ("/studio/v1/tokenize", '{"text": "%s"}', ["body", "text"]),
    ("/studio/v1/custom-model", '{"dataset_id": "1", "model_name": "m%s", "model_type": "j2-light"}',
     ["body", "model_name"]),
]
OPENAI = [
    ("/v1/completions", '{"model": "j2-light", "prompt": "a%sb"}', "prompt"),
    ("/v1/completions", '{"model": "j2-light", "prompt": ["ok", "a%sb"]}', "prompt.1"),
    ("/v1/completions", '{"model": "%s", "prompt": "x"}', "model"),
    ("/v1/completions", '{"model": "j2-light", "prompt": "x", "stop": "%s"}', "stop"),
    ("/v1/chat/completions", '{"model": "j2-light", "messages": [{"role": "user", "content": "%s"}]}',
     "messages.0.content"),
]


@pytest.mark.parametrize("path,body,loc", AI21)
def test_ai21_routes_name_the_field(server, path, body, loc):
    r = httpx.post(server.url + path, headers={**server.headers, "Content-Type": "application/json"},
                   content=(body % LONE).encode(), timeout=30)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == loc
    assert "surrogate" in error["msg"]


@pytest.mark.parametrize("path,body,param", OPENAI)
def test_openai_routes_name_the_field(server, path, body, param):
    r = httpx.post(server.url + path, headers={**server.headers, "Content-Type": "application/json"},
                   content=(body % LONE).encode(), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_body_without_content_type_is_checked_too(server):
    r = httpx.post(server.url + "/studio/v1/tokenize", headers=server.headers,
                   content=('{"text": "%s"}' % LONE).encode(), timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "text"]


def test_a_paired_surrogate_is_ordinary_text(server):
    """\\ud83c\\udf0a is a valid pair: the wave emoji, tokenized as usual."""
    r = httpx.post(server.url + "/studio/v1/tokenize", headers={**server.headers, "Content-Type": "application/json"},
                   content=b'{"text": "\\ud83c\\udf0a"}', timeout=30)
    assert r.status_code == 200 and r.json()["text"] == "\U0001F30A"


def test_surrogate_path_and_escape():
    data = json.loads('{"a": [1, {"b": "x\\udfffy"}], "c": "ok"}')
    assert surrogate_path(data) == ("a", 1, "b")
    assert surrogate_path({"fine": ["\U0001F30A"]}) is None
    assert without_surrogates("x\udfffy") == "x\\udfffy"
