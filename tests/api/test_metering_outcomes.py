"""The meter's outcome for a stream that fails after its 200 has gone out: an `error` event ends
it, and its usage row says error, not ok (in process: such a failure cannot be provoked on demand
in a live server's engine)."""
from __future__ import annotations

import asyncio
from datetime import date

import httpx
import pytest
from fastapi import FastAPI, Request

from amber.api.metering import Metering, Metrics, meter
from amber.api.streaming import event_stream
from amber.store.repo import Store


@pytest.mark.parametrize("fails", [False, True])
def test_a_stream_that_ends_in_an_error_event_is_recorded_as_an_error(tmp_path, fails):
    store = Store.open(f"sqlite:///{tmp_path / 'amber.db'}")
    key = store.create_key("alice")
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(http: Request):
        usage = meter(http, "m")

        async def chunks():
            usage.prompt_tokens, usage.completion_tokens = 4, 1
            yield {"choices": [{"delta": {"content": "a"}}]}
            if fails:
                raise RuntimeError("the engine died")
        return event_stream(chunks(), usage)

    app.add_middleware(Metering, store=store, metrics=Metrics(pool=None))

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://amber") as client:
            return await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"})
    r = asyncio.run(call())
    assert r.status_code == 200
    assert ("generation failed" in r.text) == fails and ("[DONE]" in r.text) != fails
    (row,) = store.usage.records(store.get_account("alice").id, date.today(), date.today())
    assert (row.status, row.http_status, row.model, row.prompt_tokens) == ("error" if fails else "ok", 200, "m", 4)
    store.close()
