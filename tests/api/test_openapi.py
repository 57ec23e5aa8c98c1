"""The OpenAPI documents say what the server does: bounds in standard JSON Schema keys, every error
status each route answers (in its API's shape), the bearer key, and both APIs in /openapi.json.

The documents are built from the routes alone, so the app is made without a model pool or store.
"""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from amber.api.app import create_app
from amber.config import Limits

REF = "#/components/schemas/"
NOT_JSON_SCHEMA = {"ge", "le", "gt", "lt", "min_length", "max_length", "allow_inf_nan", "multiple_of"}
LIMITS = Limits()


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(None, None, None))  # no lifespan: nothing loads


@pytest.fixture(scope="module")
def doc(client):
    return client.get("/openapi.json").json()


def operations(doc):
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def keys_outside_properties(node, seen=None):
    """Every schema keyword used (a property's own name is not one)."""
    seen = set() if seen is None else seen
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "properties":
                seen.add(key)
            keys_outside_properties(value if key != "properties" else list(value.values()), seen)
    elif isinstance(node, list):
        for value in node:
            keys_outside_properties(value, seen)
    return seen


def field(doc, schema, name):
    """A property's schema, its non-null branch if it is nullable."""
    prop = doc["components"]["schemas"][schema]["properties"][name]
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    return branches[0]


def test_bounds_are_standard_json_schema(doc):
    assert not keys_outside_properties(doc) & NOT_JSON_SCHEMA
    for schema, name, low, high in [("CompleteRequest", "numResults", 1, LIMITS.max_num_results),
                                    ("CompleteRequest", "maxTokens", 0, LIMITS.max_tokens),
                                    ("CompleteRequest", "topKReturn", 0, LIMITS.max_top_k_return),
                                    ("CompleteRequest", "topP", 0, 1),
                                    ("J2ChatRequest", "maxTokens", 0, LIMITS.max_tokens),
                                    ("ChatCompletionsRequest", "n", 1, LIMITS.max_num_results),
                                    ("ChatCompletionsRequest", "max_tokens", 1, LIMITS.max_tokens),
                                    ("CompletionRequest", "max_tokens", 0, LIMITS.max_tokens),
                                    ("ChatCompletionRequest", "top_logprobs", 0, LIMITS.max_top_k_return)]:
        assert (field(doc, schema, name)["minimum"], field(doc, schema, name)["maximum"]) == (low, high), name
    assert field(doc, "CompleteRequest", "prompt")["maxLength"] == LIMITS.max_prompt_chars
    assert field(doc, "CompleteRequest", "stopSequences")["maxItems"] == LIMITS.max_stop_sequences
    assert field(doc, "ChatCompletionRequest", "seed")["exclusiveMaximum"] == 2**63
    assert field(doc, "CreateCustomModel", "learning_rate")["exclusiveMinimum"] == 0


def test_both_apis_are_in_the_main_document(doc, client):
    v1 = client.get("/v1/openapi.json").json()
    assert {"/studio/v1/{model}/complete", "/studio/v1/chat/completions", "/v1/completions",
            "/v1/chat/completions", "/v1/models", "/v1/models/{model}"} <= set(doc["paths"])
    assert {"/v1" + path for path in v1["paths"]} <= set(doc["paths"])
    assert v1["servers"] == [{"url": "/v1"}]  # its paths are relative to where it is mounted
    ids = [op["operationId"] for _, op in operations(doc)]
    assert len(ids) == len(set(ids))
    # both APIs have a ResponseFormat; the mounted one's is renamed, and its references with it
    assert field(doc, "ChatCompletionRequest", "response_format")["$ref"] == REF + "OpenAIResponseFormat"
    assert field(doc, "ChatCompletionsRequest", "response_format")["$ref"] == REF + "ResponseFormat"


def test_every_reference_resolves(doc, client):
    for document in (doc, client.get("/v1/openapi.json").json()):
        refs = set()

        def collect(node):
            if isinstance(node, dict):
                refs.update(v for k, v in node.items() if k == "$ref")
                [collect(v) for v in node.values()]
            elif isinstance(node, list):
                [collect(v) for v in node]
        collect(document)
        assert {r.removeprefix(REF) for r in refs} <= set(document["components"]["schemas"])


def error_schema(operation, status):
    return operation["responses"][status]["content"]["application/json"]["schema"]["$ref"].removeprefix(REF)


def test_every_route_documents_its_errors(doc):
    for name, operation in operations(doc):
        responses = operation["responses"]
        if name == "GET /health":
            assert error_schema(operation, "503") == "Unhealthy" and "security" not in operation
            continue
        assert operation["security"] == [{"bearer": []}], name
        assert "WWW-Authenticate" in responses["401"]["headers"], name
        body = "requestBody" in operation
        if " /v1/" in name:  # OpenAI's shape, invalid input a 400, never FastAPI's 422
            assert "422" not in responses and (not body or "400" in responses), name
            shapes = {error_schema(operation, s) for s in responses if s[0] in "45"}
            assert shapes == {"OpenAIErrorBody"}, name
        else:
            assert not body or error_schema(operation, "422") == "HTTPValidationError", name
            shapes = {error_schema(operation, s) for s in responses if s[0] in "45" and s != "422"}
            assert shapes == {"Detail"}, name
        if name.endswith("/complete") or "chat" in name or name.endswith("/completions"):
            assert {"404", "429", "499"} <= set(responses), name
            assert "Retry-After" in responses["429"]["headers"], name
    paths = doc["paths"]
    assert {"413", "422", "400"} <= set(paths["/studio/v1/dataset"]["post"]["responses"])
    assert "409" in paths["/studio/v1/dataset/{dataset_id}"]["delete"]["responses"]
    assert "409" in paths["/studio/v1/{model}/{custom}/complete"]["post"]["responses"]
    assert "text/event-stream" in paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
