"""Running a route's engine requests: all at once, abandoned when the client goes away.

Shared by every API that generates; knows engine requests and HTTP exceptions (429 when the
queue is full or the account's rate limit is reached, 400 when numResults x (prompt + max tokens)
exceeds the server's KV memory, 499 when the client left, 500 when a custom model cannot be loaded,
503 when the engine replica serving a request died), never a wire format. Every generation is admitted against its account's
rate limits here (rate_limits.py), and settled with the tokens it used when it ends.
"""
from __future__ import annotations

import asyncio
import math
from typing import AsyncIterator

from fastapi import HTTPException, Request

from amber.api import rate_limits
from amber.engine.engine import ContextTooLong, Engine, EngineUnavailable, QueueFull
from amber.engine.lora import AdapterError
from amber.engine.types import GenerationRequest, RequestOutput, TokenLogprob
from amber.ratelimit import Reservation

Event = list[tuple[int, TokenLogprob]] | RequestOutput  # what Engine.stream yields


MAX_RETRY_AFTER_S = 120


def retry_after(exc: QueueFull) -> int:
    """Whole seconds until the requests now waiting would have finished at the engine's recent
    pace (at least 1, at most MAX_RETRY_AFTER_S): a retry then finds a short queue."""
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(exc.drain_seconds)))


def busy(exc: QueueFull) -> HTTPException:
    return HTTPException(429, f"server busy: {exc}", headers={"Retry-After": str(retry_after(exc))})


def too_big(exc: ContextTooLong) -> HTTPException:
    return HTTPException(400, f"request too large for this server: {exc}")


def gone(exc: EngineUnavailable) -> HTTPException:
    """A replica died under the request: 503, which the SDKs retry (another replica answers)."""
    return HTTPException(503, f"the engine replica serving this request went away; retry: {exc}",
                         headers={"Retry-After": "1"})


async def generate_all(http: Request, engine: Engine, requests: list[GenerationRequest]) -> list[RequestOutput]:
    """Every request's output, in order. If one fails (a full queue for the later prompts of a
    multi-prompt request, say), or the client disconnects first, all are abandoned: the ones
    already queued leave at the engine's next step."""
    reservation = rate_limits.admit(http, requests)
    tasks = [asyncio.ensure_future(engine.generate(r)) for r in requests]
    try:
        while True:
            done, pending = await asyncio.wait(tasks, timeout=0.2, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if t.exception() is not None]
            if failed:
                raise failed[0].exception()
            if not pending:
                return [t.result() for t in tasks]
            if await http.is_disconnected():
                raise HTTPException(499, "client closed the request")
    except QueueFull as exc:
        raise busy(exc) from exc
    except ContextTooLong as exc:  # numResults x (prompt + max tokens) past what the KV pool holds
        raise too_big(exc) from exc
    except AdapterError as exc:  # a custom model's files are missing or damaged
        raise HTTPException(500, f"could not load the custom model: {exc}") from exc
    except EngineUnavailable as exc:
        raise gone(exc) from exc
    finally:
        for task in tasks:
            task.cancel()  # no-op for finished ones; aborts the rest in the engine
        for i, (request, task) in enumerate(zip(requests, tasks)):
            reservation.settle(i, _spent(request, task))


def _spent(request: GenerationRequest, task: asyncio.Future) -> int | None:
    """What a request used if it finished, 0 if the queue refused it, None if it was abandoned or
    failed on the way (its reservation then stands)."""
    if not task.done() or task.cancelled():
        return None
    if task.exception() is None:
        return used(request, task.result())
    return 0 if isinstance(task.exception(), QueueFull) else None


def used(request: GenerationRequest, out: RequestOutput) -> int:
    """Tokens a finished request used: BOS + prompt, and every sample's completion."""
    return 1 + len(request.prompt_ids) + sum(len(c.tokens) for c in out.completions)


async def open_streams(http: Request, engine: Engine, requests: list[GenerationRequest]) -> list[AsyncIterator[Event]]:
    """Submit every request now, so a full queue or a rate limit is a 429 before any response starts."""
    reservation = rate_limits.admit(http, requests)
    streams = []
    try:
        for request in requests:
            streams.append(await engine.open_stream(request))
    except (QueueFull, ContextTooLong, EngineUnavailable) as exc:
        for request in requests[:len(streams)]:
            engine.abort(request.request_id)
        for i in range(len(requests)):
            reservation.settle(i, 0)  # never ran
        mapping = {QueueFull: busy, ContextTooLong: too_big, EngineUnavailable: gone}
        raise next(f(exc) for kind, f in mapping.items() if isinstance(exc, kind)) from exc
    return [_settled(stream, i, request, reservation) for i, (stream, request) in enumerate(zip(streams, requests))]


async def _settled(stream: AsyncIterator[Event], part: int, request: GenerationRequest,
                   reservation: Reservation) -> AsyncIterator[Event]:
    """The stream, settling its reservation with what it used once it ends (or keeping the
    reservation when it ends without a final output: cancelled, failed)."""
    final = None
    try:
        async for event in stream:
            if isinstance(event, RequestOutput):
                final = event
            yield event
    finally:
        await stream.aclose()
        reservation.settle(part, None if final is None else used(request, final))


async def merge(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several streams as they come, as (stream index, event). Leaving early (the
    client went away) cancels every stream, which aborts its request."""
    if len(streams) == 1:  # the common case needs no tasks
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Event]) -> None:
        try:
            async for event in stream:
                queue.put_nowait((i, event))
        except Exception as exc:
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, event = await queue.get()
            if event is None:
                running -= 1
            elif isinstance(event, Exception):
                raise event
            else:
                yield i, event
    finally:
        for task in tasks:
            task.cancel()
