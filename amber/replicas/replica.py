"""One engine replica: a ModelPool (this process's engines, continuous batching, mixed-adapter
batches) behind methods that Ray Serve calls from the API process (`remote.py`).

Requests for a custom model arrive with its adapter key as Ray Serve's multiplexed model id:
`_hold` records the key as held here (up to `adapter_slots`, least recently used out), so that the
router sends that adapter's next requests to a replica that already has it in memory. The engine
reads the adapter off its own thread as it would in a single process. Each answer says whether its
adapter was already held here (`_held` mirrors Ray's LRU), which the API side counts.
"""
from __future__ import annotations

import asyncio
import logging
import dataclasses
import os
import threading
import time
from collections import OrderedDict
from typing import AsyncIterator

from amber.config import Config, Registry
from amber.engine.lora import AdapterError
from amber.engine.types import AdapterRef, GenerationRequest
from amber.files import SharedFiles
from amber.files.adapter_cache import engine_key, split_engine_key
from amber.replicas.board import POST_EVERY_S, open_board
from amber.replicas.wire import Admitted, Generated, refusal
from amber.serving import ModelPool

log = logging.getLogger(__name__)


class EngineReplica:
    def __init__(self, config: Config, registry: Registry, adapter_slots: int):
        from ray import serve
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.pool = ModelPool(config, registry)
        self.files = SharedFiles.open(config)  # this replica's own copies of adapters from shared storage
        self.pool.get(registry.default)  # ready before Ray routes anything here

        async def hold(key: str) -> str:  # what Ray Serve's multiplexing tracks: nothing to free
            return key
        self._hold = serve.multiplexed(max_num_models_per_replica=adapter_slots)(hold)
        self._held: OrderedDict[str, None] = OrderedDict()
        self._slots = adapter_slots
        self._id = serve.get_replica_context().replica_id.unique_id
        threading.Thread(target=self._post_stats, args=(open_board(),), name="amber-board", daemon=True).start()

    def _post_stats(self, board) -> None:
        """Twice a second the stats to the board; when due, forget adapters deleted from storage."""
        while True:
            try:
                board.post.remote(self._id, self.stats())
                if self.files.adapters.sweep_due():
                    self._forget_deleted()
            except Exception as exc:  # the board is gone with its cluster: this replica soon is too
                log.warning("posting stats: %s", exc)
            time.sleep(POST_EVERY_S)

    def _forget_deleted(self) -> None:
        for key, version in self.files.adapters.sweep():
            for loaded in self.pool.loaded().values():
                loaded.engine.forget_adapter(engine_key(key, version))

    def _localized(self, request: GenerationRequest) -> GenerationRequest:
        """The request with its adapter read from this replica's copy (the API's path is a copy on
        the API's host; on another node it does not exist). Blocking."""
        adapter = request.adapter
        if adapter is None or os.path.isdir(adapter.path):
            return request
        try:
            path = self.files.adapters.local(*split_engine_key(adapter.key))
        except (FileNotFoundError, ValueError) as exc:
            raise AdapterError(f"no adapter files for {adapter.key} in shared storage") from exc
        return dataclasses.replace(request, adapter=AdapterRef(adapter.key, str(path)))

    async def _engine(self, model: str, request: GenerationRequest):
        """The model's engine, the request as this replica runs it, and whether its adapter was
        already held here (None: no adapter)."""
        held = None
        if request.adapter is not None:
            key = request.adapter.key
            held = key in self._held
            await self._hold(key)
            self._held[key] = None
            self._held.move_to_end(key)
            while len(self._held) > self._slots:
                self._held.popitem(last=False)
            request = await asyncio.to_thread(self._localized, request)
        return (await asyncio.to_thread(self.pool.get, model)).engine, request, held

    async def generate(self, model: str, request: GenerationRequest):
        """Generated (the RequestOutput), or a Refusal. Cancelled by the caller: the engine drops the request."""
        try:
            engine, request, held = await self._engine(model, request)
            return Generated(await engine.generate(request), held)
        except Exception as exc:
            if (r := refusal(exc)) is None:
                raise
            return r

    async def stream(self, model: str, request: GenerationRequest) -> AsyncIterator:
        """Admitted (or a Refusal, and nothing more), then the engine's events; the caller closing
        or cancelling the stream aborts the request."""
        try:
            engine, request, held = await self._engine(model, request)
            events = await engine.open_stream(request)
        except Exception as exc:
            if (r := refusal(exc)) is None:
                raise
            yield r
            return
        yield Admitted(held)
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
        """This replica's process id, each loaded model's engine counters, the adapters it holds."""
        return {"pid": os.getpid(), "engines": self.pool.stats(), "kernels": self.pool.kernels(),
                "adapters_held": len(self._held)}

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
