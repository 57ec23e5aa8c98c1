"""The API side of engine replicas: `RemotePool` and `RemoteEngine` stand where `ModelPool` and
`Engine` stand in a single process, so the API layer runs unchanged in front of Ray Serve.

Each call goes through a Ray Serve handle to the engine deployment (`replica.py`): a custom
model's requests carry its adapter key as the multiplexed model id (Ray routes them to a replica
that holds it), the base model's go to the least loaded replica. A replica that dies under a
request raises EngineUnavailable (the API answers 503, which the SDKs retry); a refusal from the
replica's engine is raised as the same exception a local engine raises (429, 400, ...).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, AsyncIterator

from amber.config import Config, Registry
from amber.engine.chat_template import ChatTemplate
from amber.engine.checkpoint import ensure_checkpoint
from amber.engine.engine import EngineUnavailable
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import GenerationRequest, RequestOutput
from amber.replicas.wire import Admitted, Generated, Refusal, as_exception
from amber.serving import LoadedModel, ModelUnavailable

log = logging.getLogger(__name__)
STATS_TIMEOUT_S = 5.0


def _unavailable(exc: BaseException) -> BaseException:
    """A Ray error as the API should see it: a replica or its actor gone is EngineUnavailable;
    an exception raised by replica code (a bug) stays what it was."""
    from ray.exceptions import RayError, RayTaskError
    from ray.serve.exceptions import BackPressureError, RequestCancelledError
    if isinstance(exc, RequestCancelledError):
        return asyncio.CancelledError()
    if isinstance(exc, BackPressureError):
        from amber.engine.scheduler import QueueFull
        return QueueFull(f"every engine replica is at its limit of waiting requests: {exc}", 1.0)
    if isinstance(exc, RayError) and not isinstance(exc, RayTaskError):
        return EngineUnavailable(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return exc


class RemoteEngine:
    """One model's engine, in whichever replica Ray routes each request to."""

    def __init__(self, handle: Any, model: str, max_batch: int, bos_id: int | None):
        self._handle, self.model, self.max_batch, self.bos_id = handle, model, max_batch, bos_id
        self._calls: dict[str, Any] = {}  # request id -> its Ray response, so abort can cancel it
        # custom-model requests, and those that reached a replica already holding their adapter
        self.adapter_requests = self.adapter_held = 0

    def _count(self, held: bool | None) -> None:
        if held is not None:
            self.adapter_requests += 1
            self.adapter_held += held

    def _route(self, request: GenerationRequest, **options):
        if request.adapter is not None:
            options["multiplexed_model_id"] = request.adapter.key
        return self._handle.options(**options) if options else self._handle

    async def generate(self, request: GenerationRequest) -> RequestOutput:
        call = self._route(request).generate.remote(self.model, request)
        self._calls[request.request_id] = call
        try:
            out = await call
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as exc:
            raise _unavailable(exc) from exc
        finally:
            self._calls.pop(request.request_id, None)
        if isinstance(out, Refusal):
            raise as_exception(out)
        assert isinstance(out, Generated), out
        self._count(out.adapter_held)
        return out.output

    async def open_stream(self, request: GenerationRequest) -> AsyncIterator:
        """Queued in a replica's engine when this returns (or QueueFull, ... raised here)."""
        call = self._route(request, stream=True).stream.remote(self.model, request)
        self._calls[request.request_id] = call
        try:
            first = await call.__anext__()
        except BaseException as exc:
            self._calls.pop(request.request_id, None)
            call.cancel()
            raise exc if isinstance(exc, asyncio.CancelledError) else _unavailable(exc) from exc
        if isinstance(first, Refusal):
            self._calls.pop(request.request_id, None)
            raise as_exception(first)
        assert isinstance(first, Admitted), first
        self._count(first.adapter_held)
        return self._events(request.request_id, call)

    async def _events(self, request_id: str, call) -> AsyncIterator:
        finished = False
        try:
            async for item in call:
                if isinstance(item, Refusal):
                    finished = True
                    raise as_exception(item)
                finished = isinstance(item, RequestOutput)
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise _unavailable(exc) from exc
        finally:
            self._calls.pop(request_id, None)
            if not finished:
                call.cancel()  # the replica's stream closes, which aborts the request there

    def forget_adapter(self, key: str) -> None:
        """Nothing to do here: each replica notices deletions from shared storage itself."""

    def abort(self, request_id: str) -> None:
        if (call := self._calls.pop(request_id, None)) is not None:
            call.cancel()


class RemotePool:
    """ModelPool's surface over the engine deployment: models resolve here, run in replicas."""

    def __init__(self, config: Config, registry: Registry, handle: Any, board: Any):
        self.config, self.registry, self._handle, self._board = config, registry, handle, board
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self._stats: tuple[float, dict] = (0.0, {})

    def get(self, name: str) -> LoadedModel:
        """Blocking (call it off the event loop): asks a replica to load the model if it has not."""
        spec = self.registry.resolve(name)
        if spec is None:
            raise KeyError(name)
        with self._lock:
            if spec.name not in self._loaded:
                try:
                    info = self._handle.describe.remote(spec.name).result()
                except Exception as exc:
                    raise ModelUnavailable(f"model {spec.name!r} cannot be served by the engine replicas: "
                                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
                checkpoint = ensure_checkpoint(spec, self.config.checkpoints_dir)  # converted by the replica
                engine = RemoteEngine(self._handle, spec.name, info["max_batch"], info["bos_id"])
                self._loaded[spec.name] = LoadedModel(spec, Tokenizer.from_pretrained(checkpoint), engine,
                                                      ChatTemplate(checkpoint, info["bos_id"]))
            return self._loaded[spec.name]

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def running(self, name: str) -> LoadedModel | None:
        """ModelPool.running: the model if it was described already, else None; never blocks."""
        spec = self.registry.resolve(name)
        return None if spec is None else self._loaded.get(spec.name)

    def replicas(self) -> dict[str, dict]:
        """Each live replica's latest stats (board.py), at most a quarter second old."""
        at, latest = self._stats
        if time.monotonic() - at > 0.25:
            try:
                import ray
                latest = ray.get(self._board.read.remote(), timeout=STATS_TIMEOUT_S)
            except Exception as exc:
                log.warning("reading the replicas' stats: %s", exc)
            self._stats = (time.monotonic(), latest)
        return latest

    def stats(self) -> dict[str, dict[str, int]]:
        """Per model: the engine counters summed over the live replicas, and this ingress's routing
        counters (custom-model requests, and how many reached a replica already holding their adapter)."""
        summed: dict[str, dict[str, int]] = {}
        for replica in self.replicas().values():
            for name, counters in replica["engines"].items():
                into = summed.setdefault(name, {})
                for key, value in counters.items():
                    into[key] = into.get(key, 0) + value
        return {name: {**summed.get(name, {}), "adapter_requests": loaded.engine.adapter_requests,
                       "adapter_already_held": loaded.engine.adapter_held}
                for name, loaded in list(self._loaded.items())}

    def kernels(self) -> dict[str, dict[str, str]]:
        return next((r["kernels"] for r in self.replicas().values()), {})

    def close(self) -> None:
        """The replicas' engines are Ray Serve's to stop."""
