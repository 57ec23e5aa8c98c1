"""Usage metering: every generating request on every API is one usage row, whatever became of it,
with the tokens its response reported; GET /studio/v1/usage groups them; /metrics counts them."""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from datetime import date, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from amber.store.repo import Store
from tests.api.conftest import create_key

pytestmark = pytest.mark.slow

NO_EOS = {"logit_bias": {"2": -100}}  # smollm's <|im_end|> banned: a generation runs to max_tokens
HI = [{"role": "user", "content": "Say hi."}]
LONG = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]


@pytest.fixture(scope="module")
def carol(server):
    """A fresh account, so that the rows of other test files never mix in."""
    env = {**os.environ, "AMBER_HOME": str(server.home)}
    return create_key(env, "carol-usage"), create_key(env, "carol-usage")


def store(server) -> Store:
    return Store.open(f"sqlite:///{server.home / 'amber.db'}")


def rows(server, account: str) -> list:
    s = store(server)
    try:
        today = date.today()
        return s.usage.records(s.get_account(account).id, today - timedelta(days=1), today + timedelta(days=1))
    finally:
        s.close()


def sse_chunks(lines: list[str]) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


async def plain(client, path, body, expect):
    r = await client.post(path, json=body)
    usage = None
    if r.status_code == 200:
        data = r.json()
        if "usage" in data:
            usage = (data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"])
        else:  # AI21 complete: its prompt's tokens (the BOS it read is not listed) and completions' tokens
            usage = (1 + len(data["prompt"]["tokens"]), sum(len(c["data"]["tokens"]) for c in data["completions"]))
    return path, expect, r.status_code, usage


async def streamed(client, path, body):
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        lines = [line async for line in r.aiter_lines()]
    usage = [c["usage"] for c in sse_chunks(lines) if c.get("usage")][-1]
    return path, "ok", r.status_code, (usage["prompt_tokens"], usage["completion_tokens"])


async def cancelled(url, headers, path, body):
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        async with client.stream("POST", path, json={**body, "stream": True}) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 4:
                    break  # hang up mid-stream
    return path, "cancelled", 200, None  # the response had started: cancelled, with its 200


def metric(text: str, name: str, **labels) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_n_concurrent_requests_give_n_rows_with_their_usage(server, carol):
    headers = {"Authorization": f"Bearer {carol[0]}"}
    before = httpx.get(f"{server.url}/metrics").text

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as client:
            jobs = [
                plain(client, "/studio/v1/j2-light/complete", {"prompt": "Hello", "maxTokens": 4}, "ok"),
                plain(client, "/studio/v1/j2-light/complete", {"prompt": "One, two,", "maxTokens": 6, "numResults": 2}, "ok"),
                plain(client, "/v1/completions", {"model": "j2-light", "prompt": ["A", "B c"], "max_tokens": 3}, "ok"),
                plain(client, "/v1/chat/completions", {"model": "j2-light", "messages": HI, "max_tokens": 5}, "ok"),
                plain(client, "/studio/v1/chat/completions", {"model": "j2-light", "messages": HI, "max_tokens": 5}, "ok"),
                streamed(client, "/v1/completions", {"model": "j2-light", "prompt": "Hi", "max_tokens": 5,
                                                     "stream_options": {"include_usage": True}}),
                streamed(client, "/v1/chat/completions", {"model": "j2-light", "messages": HI, "max_tokens": 5, "n": 2,
                                                          "stream_options": {"include_usage": True}}),
                streamed(client, "/studio/v1/chat/completions", {"model": "j2-light", "messages": HI, "max_tokens": 5}),
                plain(client, "/studio/v1/no-such-model/complete", {"prompt": "x"}, "error"),
                plain(client, "/v1/chat/completions", {"model": "no-such-model", "messages": HI}, "error"),
                plain(client, "/v1/completions", {"model": "j2-light", "prompt": "x", "max_tokens": -1}, "error"),
                plain(client, "/studio/v1/j2-light/complete", {"prompt": "x", "temperature": "hot"}, "error"),
                cancelled(server.url, headers, "/v1/chat/completions",
                          {"model": "j2-light", "messages": LONG, "max_tokens": 400, **NO_EOS}),
                cancelled(server.url, headers, "/v1/completions",
                          {"model": "j2-light", "prompt": "Count:", "max_tokens": 400, **NO_EOS}),
                cancelled(server.url, headers, "/studio/v1/chat/completions",
                          {"model": "j2-light", "messages": LONG, "max_tokens": 400}),
            ]
            return await asyncio.gather(*jobs)

    sent = asyncio.run(run())
    deadline = time.monotonic() + 15
    got = rows(server, "carol-usage")
    while any(r.status == "running" for r in got):  # a hung-up stream's row closes as its task ends
        assert time.monotonic() < deadline, got
        time.sleep(0.1)
        got = rows(server, "carol-usage")
    assert len(got) == len(sent)
    assert all(r.key_prefix == carol[0][:14] for r in got)
    for path, status, code, usage in sent:
        if status == "ok":
            assert code == 200, (path, code)
    expected = Counter((path, status, code, usage) for path, status, code, usage in sent)
    recorded = Counter((r.path, r.status, r.http_status,
                        (r.prompt_tokens, r.completion_tokens) if r.status == "ok" else None) for r in got)
    assert recorded == expected
    assert all(r.latency_ms > 0 for r in got)
    cut = [r for r in got if r.status == "cancelled"]  # billed what they had read and generated
    assert cut and all(r.prompt_tokens > 1 and r.completion_tokens >= 1 for r in cut)
    assert all(r.first_token_ms is not None and r.first_token_ms <= r.latency_ms for r in got if r.status == "ok")

    after = httpx.get(f"{server.url}/metrics").text
    for status in ("ok", "error", "cancelled"):
        moved = metric(after, "amber_requests_total", status=status) - metric(before, "amber_requests_total", status=status)
        assert moved == sum(1 for s in sent if s[1] == status), status
    ok_rows = [r for r in got if r.status == "ok"]
    for kind, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
        moved = (metric(after, "amber_tokens_total", status="ok", kind=kind, model="j2-light")
                 - metric(before, "amber_tokens_total", status="ok", kind=kind, model="j2-light"))
        assert moved == sum(getattr(r, field) for r in ok_rows)
    assert metric(after, "amber_request_latency_seconds_count") >= len(sent)
    for name in ("amber_queue_depth", "amber_batch_size", "amber_adapter_slots_in_use"):
        assert metric(after, name, engine="smollm2-135m-instruct") == 0


def test_usage_endpoint_groups_by_day_model_and_key(server, carol):
    today = date.today().isoformat()
    got = rows(server, "carol-usage")
    assert got, "run after the concurrent test"
    second = {"Authorization": f"Bearer {carol[1]}"}
    r = httpx.post(f"{server.url}/v1/completions", headers=second, timeout=60,
                   json={"model": "j2-light", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
    body = httpx.get(f"{server.url}/studio/v1/usage", params={"start": today, "end": today},
                     headers={"Authorization": f"Bearer {carol[0]}"}).json()
    assert body["start"] == body["end"] == today
    groups = {(g["date"], g["model"], g["key"]): g for g in body["usage"]}
    by_key_model = Counter((r.model, r.key_prefix) for r in got)
    assert groups[(today, "j2-light", carol[1][:14])]["requests"] == 1
    assert groups[(today, "j2-light", carol[1][:14])]["completionTokens"] == r.json()["usage"]["completion_tokens"]
    mine = groups[(today, "j2-light", carol[0][:14])]
    assert mine["requests"] == by_key_model[("j2-light", carol[0][:14])]
    assert mine["promptTokens"] == sum(r.prompt_tokens for r in got if r.model == "j2-light")
    assert body["total"]["requests"] == len(got) + 1
    assert body["total"]["failed"] == sum(1 for r in got if r.status != "ok")

    yesterday = (date.today() - timedelta(days=1)).isoformat()
    empty = httpx.get(f"{server.url}/studio/v1/usage", params={"start": yesterday, "end": yesterday},
                      headers={"Authorization": f"Bearer {carol[0]}"}).json()
    assert empty["usage"] == [] and empty["total"]["requests"] == 0
    bad = httpx.get(f"{server.url}/studio/v1/usage", params={"start": today, "end": yesterday},
                    headers={"Authorization": f"Bearer {carol[0]}"})
    assert bad.status_code in (400, 422)


def test_another_account_sees_none_of_them(server, carol):
    env = {**os.environ, "AMBER_HOME": str(server.home)}
    stranger = create_key(env, "dave-usage")
    body = httpx.get(f"{server.url}/studio/v1/usage", headers={"Authorization": f"Bearer {stranger}"}).json()
    assert body["usage"] == [] and body["total"]["requests"] == 0
    assert httpx.get(f"{server.url}/studio/v1/usage").status_code == 401


def test_metrics_is_prometheus_text_without_a_key(server):
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"amber_requests", "amber_tokens", "amber_request_latency_seconds", "amber_time_to_first_token_seconds",
            "amber_queue_depth", "amber_batch_size", "amber_adapter_slots_in_use"} <= names
