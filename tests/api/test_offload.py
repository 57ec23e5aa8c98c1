"""Where a route's work runs (api/offload.py): small work on the event loop, large work in a worker
thread; and the running model is found without waiting on a pool that is loading another one."""
from __future__ import annotations

import asyncio
import threading

from amber.api import offload
from amber.config import Config, ModelSpec, Registry
from amber.serving import ModelPool


def test_small_work_runs_on_the_event_loop_and_large_work_in_a_thread():
    async def where(size: int) -> threading.Thread:
        return await offload.run(threading.current_thread, size=size, limit=10)

    loop_thread = threading.current_thread()  # asyncio.run runs the loop here
    assert asyncio.run(where(10)) is loop_thread
    assert asyncio.run(where(11)) is not loop_thread


def test_the_running_model_is_found_while_the_pool_is_busy_loading(tiny_checkpoint, tmp_path):
    spec = ModelSpec("tiny", path=str(tiny_checkpoint), max_context=256, aliases=("small",))
    pool = ModelPool(Config(home=tmp_path), Registry("tiny", {"tiny": spec}))
    try:
        assert pool.running("tiny") is None and pool.running("nonesuch") is None  # not loaded, unknown
        loaded = pool.get("tiny")
        found = []
        with pool._lock:  # as while get() loads another model: running() must not wait for it
            looker = threading.Thread(target=lambda: found.extend([pool.running("tiny"), pool.running("small")]))
            looker.start()
            looker.join(10)
            assert not looker.is_alive(), "running() waited on the pool's lock"
        assert found == [loaded, loaded]
        assert asyncio.run(offload.running_model(pool, "small")) is loaded
    finally:
        pool.close()
