"""Rate limits per account against a live `amber serve`: limits set with `amber accounts limits`
while it runs, held across concurrent requests, answered in each API's own error shape. On the
shared server (conftest.py): the accounts limited here are this file's own."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess

import httpx
import pytest

from tests.api.conftest import AMBER, create_key


def amber(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AMBER, *args], env={**os.environ, "AMBER_HOME": str(server.home)},
                          capture_output=True, text=True, timeout=60)


def limited_key(server, account: str, *limits: str) -> dict:
    """Headers for a new account's key, its limits set through the CLI."""
    key = create_key({**os.environ, "AMBER_HOME": str(server.home)}, account)
    out = amber(server, "accounts", "limits", account, *limits)
    assert out.returncode == 0, out.stderr
    return {"Authorization": f"Bearer {key}"}


API = {  # path, body, and how the API shapes a 429's body
    "ai21": ("/studio/v1/tiny/complete", {"prompt": "hello", "maxTokens": 2},
             lambda body: isinstance(body["detail"], str) and "requests per minute" in body["detail"]),
    "openai": ("/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 2},
               lambda body: body["error"]["code"] == "rate_limit_exceeded"
               and "requests per minute" in body["error"]["message"]),
}


@pytest.mark.parametrize("api", API)
def test_50_concurrent_requests_against_10_per_minute_let_exactly_10_through(server, api):
    path, body, shaped = API[api]
    headers = limited_key(server, f"burst-{api}", "--rpm", "10")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120,
                                     limits=httpx.Limits(max_connections=50)) as client:
            return await asyncio.gather(*(client.post(path, json=body) for _ in range(50)))

    answers = asyncio.run(burst())
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(ok) == 10 and len(refused) == 40, [r.status_code for r in answers]
    for r in ok:
        assert r.headers["x-ratelimit-limit-requests"] == "10"
        assert 0 <= int(r.headers["x-ratelimit-remaining-requests"]) < 10
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == list(range(10))
    for r in refused:
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["x-ratelimit-limit-requests"] == "10"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert shaped(r.json()), r.json()


def test_tokens_per_minute_refuse_once_the_tokens_are_spent(server):
    headers = limited_key(server, "tokens", "--tpm", "40")
    body = {"model": "tiny", "prompt": "count the tokens", "max_tokens": 8, "temperature": 0}
    # a stream first: its tokens are settled when it ends
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=headers, timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-tokens"] == "40"
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    spent = [chunks[-1]["usage"]["total_tokens"]]
    for _ in range(10):
        r = httpx.post(f"{server.url}/v1/completions", headers=headers, json=body, timeout=60)
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        assert sum(spent) < 40  # admitted only while the minute's tokens were not all spent
        spent.append(r.json()["usage"]["total_tokens"])
    assert r.status_code == 429 and sum(spent) >= 40, spent
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "tokens per minute" in r.json()["error"]["message"]
    assert r.headers["x-ratelimit-remaining-tokens"] == "0" and int(r.headers["retry-after"]) >= 1
    # the AI21 API shares the account's window, and answers in its own shape
    r = httpx.post(f"{server.url}/studio/v1/tiny/complete", headers=headers, json={"prompt": "x"}, timeout=60)
    assert r.status_code == 429 and "tokens per minute" in r.json()["detail"]
    # what does not generate is not limited
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 200
    assert httpx.post(f"{server.url}/studio/v1/tokenize", headers=headers, json={"text": "x"}).status_code == 200


def test_other_accounts_are_unaffected(server):
    headers = limited_key(server, "once", "--rpm", "1")
    path, body, _ = API["ai21"]
    assert httpx.post(server.url + path, headers=headers, json=body, timeout=60).status_code == 200
    assert httpx.post(server.url + path, headers=headers, json=body, timeout=60).status_code == 429
    r = httpx.post(server.url + path, headers=server.headers, json=body, timeout=60)  # alice: no limits
    assert r.status_code == 200 and not any(h.startswith("x-ratelimit") for h in r.headers)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_limits_are_set_shown_and_reset_from_the_cli_and_apply_at_once(server):
    headers = limited_key(server, "cli", "--rpm", "1", "--tpm", "1000")
    shown = amber(server, "accounts", "limits", "cli")
    assert "requests per minute: 1\n" in shown.stdout and "tokens per minute: 1000" in shown.stdout
    path, body, _ = API["openai"]
    assert httpx.post(server.url + path, headers=headers, json=body, timeout=60).status_code == 200
    assert httpx.post(server.url + path, headers=headers, json=body, timeout=60).status_code == 429
    out = amber(server, "accounts", "limits", "cli", "--rpm", "0")
    assert "requests per minute: unlimited" in out.stdout and "tokens per minute: 1000" in out.stdout
    assert httpx.post(server.url + path, headers=headers, json=body, timeout=60).status_code == 200
    out = amber(server, "accounts", "limits", "cli", "--reset")
    assert out.stdout.count("server default") == 2
    r = httpx.post(server.url + path, headers=headers, json=body, timeout=60)
    assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers


@pytest.mark.parametrize("args, says", [
    (("accounts", "limits", "nobody"), "no account 'nobody'"),
    (("accounts", "limits", "alice", "--rpm", "-1"), "--rpm"),
    (("accounts", "limits", "alice", "--tpm", "lots"), "--tpm"),
    (("accounts", "limits", "alice", "--reset", "--rpm", "5"), "--reset"),
    (("accounts", "limits", "no spaces"), "account name"),
])
def test_bad_limits_input_is_a_usage_error(server, args, says):
    out = amber(server, *args)
    assert out.returncode == 2 and says in out.stderr, out.stderr
