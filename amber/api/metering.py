"""Usage metering and Prometheus metrics for every generating request, on both APIs.

One ASGI middleware sees each generating request (a POST to a complete/chat/completions path)
from admission to its last byte: it records the request (store.usage.start) before the route
runs, and completes the record exactly once in a `finally`, whatever happened: a response, an
error, a stream read to its end, a client that hung up. Routes only say which model they were
asked for and fill the `Usage` they get back (`meter`); tokens are what the response's `usage`
says, or for a stream cut short, the prompts it had read and the tokens it had generated. The middleware knows statuses and bytes, never a wire format.

Metrics live in a registry per app (not prometheus_client's global one), served unauthenticated
at /metrics like /health: requests and tokens by model and status, latency and time-to-first-token
histograms, and per engine, read at scrape time: queue depth, batch size, adapter slots.
"""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

import anyio
from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from amber.api.streaming import Usage
from amber.serving import ModelPool
from amber.store.repo import AccountInfo, OwnLimits, Store
from amber.store.usage import CANCELLED, ERROR, OK

METERED = re.compile(r"/studio/v1/(.+/)?(complete|chat|chat/completions)|/v1/(completions|chat/completions)")
CLIENT_CLOSED = 499
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class Meter:
    """What the route tells the middleware about one request."""
    model: str | None = None
    usage: Usage = field(default_factory=Usage)


def meter(http: Request, model: str) -> Usage:
    """Routes call this first with the model the request names; the Usage they fill is recorded.
    Off a metered path (a test app, say) it is a plain Usage."""
    record = http.scope.get("state", {}).get("meter")
    if record is None:
        return Usage()
    record.model = model
    return record.usage


class Metrics:
    def __init__(self, pool: ModelPool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("amber_requests", "Generating requests by model and status",
                                ["api", "model", "status"], registry=self.registry)
        self.tokens = Counter("amber_tokens", "Tokens read (prompt) and generated (completion)",
                              ["model", "status", "kind"], registry=self.registry)
        self.latency = Histogram("amber_request_latency_seconds", "Admission to last byte", ["model"],
                                 buckets=BUCKETS, registry=self.registry)
        self.first_token = Histogram("amber_time_to_first_token_seconds", "Admission to first generated token",
                                     ["model"], buckets=BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(pool))

    def observe(self, api: str, model: str, status: str, prompt_tokens: int, completion_tokens: int,
                latency: float, first_token: float | None) -> None:
        self.requests.labels(api, model, status).inc()
        self.tokens.labels(model, status, "prompt").inc(prompt_tokens)
        self.tokens.labels(model, status, "completion").inc(completion_tokens)
        self.latency.labels(model).observe(latency)
        if first_token is not None:
            self.first_token.labels(model).observe(first_token)


class EngineCollector:
    """Each loaded engine's scheduler and adapter state, read when Prometheus scrapes."""
    GAUGES = {"waiting": ("amber_queue_depth", "Requests waiting for a place in the batch"),
              "running_samples": ("amber_batch_size", "Samples in the running batch"),
              "adapters_in_use": ("amber_adapter_slots_in_use", "Adapter slots pinned by running rows"),
              "adapters_loaded": ("amber_adapter_slots_loaded", "Adapters resident in slots")}

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def describe(self):
        return []  # the engines come and go; nothing to check at registration

    def collect(self):
        stats = self.pool.stats()
        for key, (name, doc) in self.GAUGES.items():
            gauge = GaugeMetricFamily(name, doc, labels=["engine"])
            for engine, values in stats.items():
                gauge.add_metric([engine], values.get(key, 0))
            yield gauge


class Metering:
    """The ASGI middleware: one usage row and one metrics observation per generating request."""

    def __init__(self, app: ASGIApp, store: Store, metrics: Metrics) -> None:
        self.app, self.store, self.metrics = app, store, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admitted = None
        if scope["type"] == "http" and scope["method"] == "POST" and METERED.fullmatch(scope["path"]):
            api = "openai" if scope["path"].startswith("/v1/") else "ai21"
            request_id, started = uuid.uuid4().hex, time.monotonic()
            # one hop to a worker thread for all three lookups (api/offload.py says why)
            admitted = await anyio.to_thread.run_sync(self._admit, _bearer(scope), request_id, api, scope["path"])
        if admitted is None:  # not generating, or no valid key (the route answers 401; no one to charge)
            return await self.app(scope, receive, send)
        owner, limits = admitted
        state = scope.setdefault("state", {})
        record = state["meter"] = Meter()
        state["key_owner"] = owner  # this request's key, already looked up: auth need not again
        state["own_limits"] = limits  # its account's rate limits, likewise
        sent = {"status": None, "ended": False}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["ended"] = True
            await send(message)

        raised: BaseException | None = None
        try:
            await self.app(scope, receive, watch)
        except BaseException as exc:  # CancelledError included: the record is completed all the same
            raised = exc
            raise
        finally:
            status, http_status = _outcome(sent["status"], sent["ended"], raised, record.usage.failed)
            with anyio.CancelScope(shield=True):
                await self._finish(request_id, api, record, status, http_status, started)

    def _admit(self, key: str, request_id: str, api: str,
               path: str) -> tuple[tuple[AccountInfo, str], OwnLimits] | None:
        """The key's owner and its account's own limits, with the request's usage row started;
        None for an unknown key (nothing is recorded)."""
        owner = self.store.key_owner(key)
        if owner is None:
            return None
        self.store.usage.start(request_id, owner[0].id, owner[1], api, path)
        return owner, self.store.own_limits(owner[0].id)

    async def _finish(self, request_id: str, api: str, record: Meter, status: str, http_status: int | None,
                      started: float) -> None:
        usage, now = record.usage, time.monotonic()
        prompt_tokens, completion_tokens = usage.billed()  # a stream cut short: what it had read and made
        # a stream's first token; an unstreamed answer's tokens all reach the client at its end
        first = usage.first_token_at - started if usage.first_token_at else (now - started if status == OK else None)
        await anyio.to_thread.run_sync(
            self.store.usage.finish, request_id, status, http_status, record.model, prompt_tokens,
            completion_tokens, (now - started) * 1000, None if first is None else first * 1000)
        label = record.model if record.model and http_status != 404 else "(none)"  # no label per unknown name
        self.metrics.observe(api, label, status, prompt_tokens, completion_tokens, now - started, first)


def _outcome(status: int | None, ended: bool, raised: BaseException | None, failed: bool = False
             ) -> tuple[str, int | None]:
    """(usage status, HTTP status) of a request from what was sent and what the app raised;
    `failed`: a stream that had started ended in an error event (its HTTP status stays 200)."""
    if isinstance(raised, (ClientDisconnect, OSError)) or status == CLIENT_CLOSED:
        return CANCELLED, CLIENT_CLOSED
    if raised is not None:
        return (CANCELLED, CLIENT_CLOSED) if isinstance(raised, anyio.get_cancelled_exc_class()) else (ERROR, 500)
    if status is None or not ended:  # the response never finished: the client went away mid-stream
        return CANCELLED, status if status is not None else CLIENT_CLOSED
    return (OK if status < 400 and not failed else ERROR), status


def _bearer(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" else ""
    return ""
