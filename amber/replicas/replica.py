"""One engine replica: a ModelPool (this process's engines, continuous batching, mixed-adapter
batches) behind methods that Ray Serve calls from the API process (`remote.py`).

Requests for a custom model arrive with its adapter key as Ray Serve's multiplexed model id:
`_hold` records the key as held here (up to `adapter_slots`, least recently used out), so that the
router sends that adapter's next requests to a replica that already has it in memory. The engine
reads the adapter off its own thread as it would in a single process.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import AsyncIterator

from amber.config import Config, Registry
from amber.engine.types import GenerationRequest
from amber.replicas.wire import ADMITTED, Refusal, refusal
from amber.serving import ModelPool

log = logging.getLogger(__name__)


class EngineReplica:
    def __init__(self, config: Config, registry: Registry, adapter_slots: int):
        from ray import serve
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.pool = ModelPool(config, registry)
        self.pool.get(registry.default)  # ready before Ray routes anything here

        async def hold(key: str) -> str:  # what Ray Serve's multiplexing tracks: nothing to free
            return key
        self._hold = serve.multiplexed(max_num_models_per_replica=adapter_slots)(hold)

    async def _engine(self, model: str, request: GenerationRequest):
        if request.adapter is not None:
            await self._hold(request.adapter.key)
        return (await asyncio.to_thread(self.pool.get, model)).engine

    async def generate(self, model: str, request: GenerationRequest):
        """The RequestOutput, or a Refusal. Cancelled by the caller: the engine drops the request."""
        try:
            engine = await self._engine(model, request)
            return await engine.generate(request)
        except Exception as exc:
            if (r := refusal(exc)) is None:
                raise
            return r

    async def stream(self, model: str, request: GenerationRequest) -> AsyncIterator:
        """ADMITTED (or a Refusal, and nothing more), then the engine's events; the caller closing
        or cancelling the stream aborts the request."""
        try:
            engine = await self._engine(model, request)
            events = await engine.open_stream(request)
        except Exception as exc:
            if (r := refusal(exc)) is None:
                raise
            yield r
            return
        yield ADMITTED
        try:
            async for event in events:
                yield event
        except Exception as exc:
            if (r := refusal(exc)) is None:
                raise
            yield r
        finally:
            await events.aclose()

    def describe(self, model: str) -> dict:
        """What the API side needs to stand in for this model's engine."""
        engine = self.pool.get(model).engine
        return {"max_batch": engine.max_batch, "bos_id": engine.bos_id}

    def stats(self) -> dict:
        """This replica's process id and each loaded model's engine counters."""
        return {"pid": os.getpid(), "engines": self.pool.stats(), "kernels": self.pool.kernels()}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread died is replaced."""
        for name, loaded in list(self.pool.loaded().items()):
            if not loaded.engine.alive:
                raise RuntimeError(f"the engine thread of {name} stopped")

    def __del__(self) -> None:
        try:
            self.pool.close()
        except Exception:
            pass
