"""Where a route's work runs: small work on the event loop, large or blocking work in a worker thread.

A hop to a worker thread and back costs ~0.3-1 ms on a busy 2-core machine (a thread's wake-up
and two GIL hand-overs), more than tokenizing a 30-token prompt (~0.1 ms) or building its answer.
A short request made ~10 such hops, most of its time when the prefix cache answers it without
computing (bench/ttft_parts.py). Large work (a long prompt, a long answer with token data) still
goes to a thread, so that it never holds up the other requests' streams for long."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

from fastapi.concurrency import run_in_threadpool

if TYPE_CHECKING:
    from amber.serving import LoadedModel, ModelPool

T = TypeVar("T")

# sizes up to which the work runs on the event loop: ~0.5 ms or less of it
INLINE_CHARS = 2_000   # text to tokenize (~500 tokens)
INLINE_TOKENS = 256    # tokens to turn into an answer with token data


async def run(fn: Callable[..., T], *args, size: int, limit: int) -> T:
    """fn(*args) on the event loop when `size` <= `limit`, else in a worker thread."""
    if size <= limit:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


async def running_model(pool: ModelPool, name: str) -> LoadedModel:
    """pool.get(name): at once when the model runs already (every request but the first), else in
    a worker thread, since loading takes long and holds the pool's lock."""
    return pool.running(name) or await run_in_threadpool(pool.get, name)
