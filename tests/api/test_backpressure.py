"""A full queue answers 429 with Retry-After, and loses nothing that was accepted."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from tests.api.conftest import live_server, registry

pytestmark = pytest.mark.slow


def test_full_queue_is_429_with_retry_after(default_checkpoint, tiny_checkpoint, tmp_path):
    text = registry(default_checkpoint, tiny_checkpoint, default="tiny")
    with live_server(tmp_path, text, "--max-batch", "1", "--max-queue", "1") as server:
        def call(i):
            return httpx.post(f"{server.url}/studio/v1/tiny/complete", headers=server.headers, timeout=120,
                              json={"prompt": f"request {i}", "maxTokens": 200, "minTokens": 200, "temperature": 0})
        with cf.ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(call, range(6)))
        codes = sorted(r.status_code for r in replies)
        assert 429 in codes and 200 in codes, codes
        for r in replies:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
            else:
                assert r.status_code == 200 and len(r.json()["completions"][0]["data"]["tokens"]) == 200
        too_many = httpx.post(f"{server.url}/studio/v1/tiny/complete", headers=server.headers, timeout=60,
                              json={"prompt": "x", "numResults": 2})
        assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "numResults"]
        assert httpx.get(f"{server.url}/health").status_code == 200
