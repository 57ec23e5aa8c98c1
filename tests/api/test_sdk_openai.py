"""The official `openai` SDK and LangChain's OpenAI chat model, unchanged, pointed at Amber's
/v1 base URL, each from its own venv."""
from __future__ import annotations

import pytest

from tests.api.sdk import run_client

pytestmark = pytest.mark.slow


def test_openai_sdk(server):
    r = run_client("openai", "openai_client.py", server)
    assert {"j2-light", "j1-large", "smollm2-135m-instruct"} <= set(r["models"]) and r["model"] == "j2-light"

    done = r["completion"]["choices"][0]
    assert done["text"].startswith("The capital of France is Paris")
    assert done["logprobs"]["tokens"][:6] == ["The", " capital", " of", " France", " is", " Paris"]
    streamed = r["completion_stream"]
    assert "".join(c["text"] for chunk in streamed for c in chunk["choices"]) == done["text"][len("The capital of France is"):]
    assert streamed[-1]["choices"] == [] and streamed[-1]["usage"]["completion_tokens"] == r["completion"]["usage"]["completion_tokens"]
    batch = r["completion_batch"]["choices"]
    assert sorted(c["index"] for c in batch) == [0, 1, 2, 3] and all(c["finish_reason"] == "length" for c in batch)

    chat = r["chat"]["choices"][0]
    assert "Paris" in chat["message"]["content"] and chat["finish_reason"] == "stop"
    content = chat["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == chat["message"]["content"]
    assert all(len(t["top_logprobs"]) == 2 and t["top_logprobs"][0]["logprob"] >= t["logprob"] - 1e-6 for t in content)
    first, second = r["chat_seeded"]
    assert [c["message"]["content"] for c in first["choices"]] == [c["message"]["content"] for c in second["choices"]]

    stream = r["chat_stream"]
    assert stream[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in stream if c["choices"])
    assert text == chat["message"]["content"]
    assert stream[-1]["usage"]["total_tokens"] == r["chat"]["usage"]["total_tokens"]

    assert r["errors"] == {"bad_key": ["AuthenticationError", 401, None, "invalid_api_key"],
                           "unknown_model": ["NotFoundError", 404, "model", "model_not_found"],
                           "suffix": ["BadRequestError", 400, "suffix", None],
                           "bad_value": ["BadRequestError", 400, "temperature", None]}


def test_langchain_chat_openai(server):
    r = run_client("langchain", "langchain_openai_chat.py", server)
    assert "Paris" in r["invoke"]["content"] and r["invoke"]["finish_reason"] == "stop"
    assert r["stream"]["content"] == r["invoke"]["content"] and r["stream"]["chunks"] > 3
    assert r["stream"]["usage"]["total_tokens"] == r["invoke"]["usage"]["total_tokens"]
    assert len(r["batch"]) == 2 and all(r["batch"])
