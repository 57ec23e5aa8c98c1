"""`GET /studio/v1/usage`: the caller's metered requests for a date range, by day, model and key.

Wire format only; the rows are written by `amber.api.metering` and grouped by `store.usage`.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from amber.api import docs
from amber.api.deps import Account, Store
from amber.api.errors import invalid
from amber.api.routing import TextRoute

router = APIRouter(prefix="/studio/v1", route_class=TextRoute, responses=docs.ai21(401))

MAX_DAYS = 366
DEFAULT_DAYS = 30


@router.get("/usage", responses=docs.ai21(400))
async def usage(account: Account, store: Store, start: date | None = None, end: date | None = None) -> dict:
    """Days are UTC and both ends are included; by default the last 30 days up to today."""
    end = end or datetime.now(timezone.utc).date()
    start = start or end - timedelta(days=DEFAULT_DAYS - 1)
    if start > end:
        raise invalid(("query", "start"), f"start {start} is after end {end}")
    if (end - start).days >= MAX_DAYS:
        raise invalid(("query", "start"), f"the range may span at most {MAX_DAYS} days")
    groups = await run_in_threadpool(store.usage.summary, account.id, start, end)
    rows = [{"date": g.day.isoformat(), "model": g.model, "key": g.key_prefix, "requests": g.requests,
             "failed": g.failed, "promptTokens": g.prompt_tokens, "completionTokens": g.completion_tokens,
             "totalTokens": g.prompt_tokens + g.completion_tokens} for g in groups]
    totals = {k: sum(r[k] for r in rows) for k in ("requests", "failed", "promptTokens", "completionTokens",
                                                   "totalTokens")}
    return {"start": start.isoformat(), "end": end.isoformat(), "usage": rows, "total": totals}
