"""The models a server has running: registry name -> loaded model, tokenizer, chat template and engine.

Loads lazily and once per model (the default one at start-up), so a server lists every registry
model but only pays memory for those used. Knows nothing about HTTP.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from amber.config import Config, ModelSpec, Registry
from amber.engine import kernels
from amber.engine.chat_template import ChatTemplate
from amber.engine.checkpoint import ensure_checkpoint
from amber.engine.engine import Engine
from amber.engine.loader import load_model
from amber.engine.tokenizer import Tokenizer
from amber.threads import CoreShare

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    spec: ModelSpec
    tokenizer: Tokenizer
    engine: Engine
    chat: ChatTemplate


class ModelUnavailable(RuntimeError):
    """A registry model that cannot be served (unsupported architecture, missing or corrupt weights).
    Remembered until the server restarts (it reads the registry only then), so a bad entry costs
    one failed load, not one per request; the other models serve on."""


class ModelPool:
    def __init__(self, config: Config, registry: Registry):
        self.config, self.registry = config, registry
        self._loaded: dict[str, LoadedModel] = {}
        self._failed: dict[str, ModelUnavailable] = {}
        self._lock = threading.Lock()
        # every core by default; taken now, as a thread that starts once an engine has given a
        # training job its share would inherit that smaller default
        self._cores = config.engine.threads or torch.get_num_threads()

    def get(self, name: str) -> LoadedModel:
        """The running model `name` (or alias) names, loading it on first use. KeyError if unknown,
        ModelUnavailable if it cannot be loaded."""
        spec = self.registry.resolve(name)
        if spec is None:
            raise KeyError(name)
        with self._lock:
            if spec.name in self._failed:
                raise self._failed[spec.name]
            if spec.name not in self._loaded:
                try:
                    self._loaded[spec.name] = self._load(spec)
                except Exception as exc:
                    log.exception("loading model %s failed", spec.name)
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    self._failed[spec.name] = ModelUnavailable(
                        f"model {spec.name!r} cannot be served: {reason} (fix its entry in models.toml "
                        "and restart the server)")
                    raise self._failed[spec.name] from exc
            return self._loaded[spec.name]

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def running(self, name: str) -> LoadedModel | None:
        """The model `name` names if it runs already, else None: never blocks (get() holds the
        lock while it loads), so the event loop may ask."""
        spec = self.registry.resolve(name)
        return None if spec is None else self._loaded.get(spec.name)

    def loaded(self) -> dict[str, LoadedModel]:
        return dict(self._loaded)

    def _load(self, spec: ModelSpec) -> LoadedModel:
        started = time.perf_counter()
        device, cfg = self.config.engine.device, self.config.engine

        def build():  # runs on the engine's own thread, conversion included (see Engine.launch)
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            checkpoint = ensure_checkpoint(spec, self.config.checkpoints_dir)
            model = load_model(checkpoint, spec.dtype, device, kernel_cache=self.config.kernels_dir)
            if model.kernels:
                log.info("model %s kernels (%s, %d threads): %s", spec.name, kernels.machine()["cpu"],
                         torch.get_num_threads(), kernels.summary(model.kernels))
            return model, Tokenizer.from_pretrained(checkpoint)

        # a CPU engine gives up cores to a training job on this AMBER_HOME while both work
        share = CoreShare(self.config.home, self._cores) if device == "cpu" else None
        engine = Engine.launch(build, max_batch=cfg.max_batch, max_context=spec.max_context,
                               prefill_chunk=cfg.prefill_chunk, max_queue=cfg.max_queue,
                               prefix_blocks=cfg.prefix_blocks, kv_memory_mb=cfg.kv_memory_mb,
                               threads=share and share.engine_threads)
        log.info("model %s ready on %s in %.1f s", spec.name, device, time.perf_counter() - started)
        chat = ChatTemplate(ensure_checkpoint(spec, self.config.checkpoints_dir), engine.bos_id)  # converted by now
        return LoadedModel(spec, engine.tokenizer, engine, chat)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per loaded model: requests waiting, and samples decoding in the batch."""
        return {name: m.engine.stats() for name, m in list(self._loaded.items())}

    def kernels(self) -> dict[str, dict[str, str]]:
        """Per loaded model: each quantized layer shape and the kernels chosen for it."""
        return {name: {shape: choice.describe() for shape, choice in m.engine.model.kernels.items()}
                for name, m in list(self._loaded.items())}

    def close(self) -> None:
        for loaded in self._loaded.values():
            loaded.engine.stop()


def pick_device(requested: str | None) -> str:
    """`requested` if given, else CUDA when present, else CPU."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
