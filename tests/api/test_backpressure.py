"""A full queue answers 429 with Retry-After, and loses nothing that was accepted."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from tests.api.conftest import live_server, registry

pytestmark = pytest.mark.slow


def test_full_queue_is_429_with_retry_after(default_checkpoint, tiny_checkpoint, tmp_path):
    text = registry(default_checkpoint, tiny_checkpoint, default="tiny")
    with live_server(tmp_path, text, "--max-batch", "1", "--max-queue", "1", "--no-worker") as server:
        def call(i):
            return httpx.post(f"{server.url}/studio/v1/tiny/complete", headers=server.headers, timeout=120,
                              json={"prompt": f"request {i}", "maxTokens": 200, "minTokens": 200, "temperature": 0})
        with cf.ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(call, range(6)))
        codes = sorted(r.status_code for r in replies)
        assert 429 in codes and 200 in codes, codes
        for r in replies:
            if r.status_code == 429:
                assert 1 <= int(r.headers["retry-after"]) <= 120 and "busy" in r.json()["detail"]
            else:
                assert r.status_code == 200 and len(r.json()["completions"][0]["data"]["tokens"]) == 200
        too_many = httpx.post(f"{server.url}/studio/v1/tiny/complete", headers=server.headers, timeout=60,
                              json={"prompt": "x", "numResults": 2})
        assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "numResults"]
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_multi_prompt_request_meeting_a_full_queue_takes_nothing(default_checkpoint, tiny_checkpoint, tmp_path):
    """300 prompts against a nearly full queue were a 500 that left the admitted ones queued: now
    the request is capped (400), and one whose later prompts find the queue full is a 429 that
    frees what its earlier prompts took."""
    text = registry(default_checkpoint, tiny_checkpoint, default="tiny")
    with live_server(tmp_path, text, "--max-batch", "1", "--max-queue", "4", "--no-worker") as server:
        url, headers = f"{server.url}/v1/completions", server.headers
        too_many = httpx.post(url, headers=headers, json={"model": "tiny", "prompt": ["x"] * 65}, timeout=30)
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"
        with cf.ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, url, headers=headers, timeout=120,  # holds the only batch slot
                               json={"model": "tiny", "prompt": "hold", "max_tokens": 200, "temperature": 0})
            waiting = lambda: httpx.get(f"{server.url}/health").json()["engines"]["tiny"]
            while waiting()["running_samples"] == 0:
                pass
            r = httpx.post(url, headers=headers, json={"model": "tiny", "prompt": [f"p{i}" for i in range(8)],
                                                       "max_tokens": 4}, timeout=60)
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
            assert int(r.headers["retry-after"]) >= 1
            for _ in range(200):  # the four it queued leave at the engine's next step
                if waiting()["waiting"] == 0:
                    break
            assert waiting()["waiting"] == 0
            ok = httpx.post(url, headers=headers, json={"model": "tiny", "prompt": ["a", "b", "c"], "max_tokens": 2},
                            timeout=120)
            assert ok.status_code == 200 and len(ok.json()["choices"]) == 3
            assert long.result().status_code == 200
