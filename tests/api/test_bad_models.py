"""Registry entries the server cannot serve: each request for one gets a 503 that names the model and
the reason, in each API's error shape, and the server goes on serving the others."""
from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def server(bare_server):
    """The second server (conftest.py): its registry holds `bert` and `gone`, which it cannot serve."""
    return bare_server


@pytest.mark.parametrize("model, says", [("bert", "model_type 'bert' is not supported"),
                                         ("gone", "no GGUF file at")])
def test_an_unservable_model_is_a_503_naming_it_and_the_server_serves_on(server, model, says):
    for _ in range(2):  # the second answer comes from the remembered failure, as clearly
        r = httpx.post(f"{server.url}/studio/v1/{model}/complete", headers=server.headers, timeout=60,
                       json={"prompt": "Hi", "maxTokens": 2})
        assert r.status_code == 503 and f"model {model!r} cannot be served" in r.json()["detail"], r.text
        assert says in r.json()["detail"]
        r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                       json={"model": model, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["param"] == "model" and error["code"] == "model_unavailable" and says in error["message"]
    r = httpx.post(f"{server.url}/studio/v1/j2-light/complete", headers=server.headers, timeout=60,
                   json={"prompt": "Hi", "maxTokens": 2})
    assert r.status_code == 200 and len(r.json()["completions"][0]["data"]["tokens"]) == 2
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
