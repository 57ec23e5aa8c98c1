"""Adapters resident in host memory: read from PEFT directories off the engine thread, kept ready to
copy into the engine's lanes (lora.py), least recently used evicted first.

A hundred or more custom models stay loaded at a few MB each, so serving one that was used recently
costs a copy, never a file read. Reading (safetensors, reshaping, dtype) runs on one background
thread: the engine asks with `request`, which answers at once, and a step never waits on a disk.
Knows nothing of lanes, batches or the engine; `lora.AdapterSlots` is its only user.
"""
from __future__ import annotations

import json
import math
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from amber.engine.models import family_of
from amber.engine.paged_ops import to_lanes
from amber.engine.types import AdapterRef

PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter directory that cannot be served on this base model."""


def read_adapter(path: Path, model: nn.Module, dtype: torch.dtype
                 ) -> tuple[int, list[list[list[tuple[torch.Tensor, torch.Tensor]]]]]:
    """A PEFT adapter: its rank, and per layer, target and part (q, k, v of a fused qkv...) the pair
    (A (r, in), B^T scaled (r, part's out)) in `dtype` (paged_ops.to_lanes: int8 rows carry their scale);
    zeros for parts the adapter does not train."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
        weights = load_file(path / "adapter_model.safetensors")
        rank = int(config["r"])
        scale = float(config["lora_alpha"]) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise AdapterError(f"{path}: not a readable PEFT adapter ({type(exc).__name__}: {exc})") from exc
    if config.get("use_dora") or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: only plain LoRA adapters are served (no DoRA)")
    family, unused = family_of(model), set(weights)
    layers = []
    for i, layer in enumerate(model.model.layers):
        row = []
        for target in family.lora_targets:
            width, parts = target_module(model, target).in_features, []
            for part, size in zip(family.hf_parts(model.config, target), part_sizes(model, target)):
                stem = f"{PEFT_PREFIX}{family.hf_layers}.{i}.{part}"
                a, b = weights.get(f"{stem}.lora_A.weight"), weights.get(f"{stem}.lora_B.weight")
                unused -= {f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"}
                if a is None or b is None:
                    a, b = torch.zeros(rank, width), torch.zeros(size, rank)
                elif a.shape != (rank, width) or b.shape != (size, rank):
                    raise AdapterError(f"{path}: {stem} has shapes {tuple(a.shape)}, {tuple(b.shape)}; "
                                       f"this base needs ({rank}, {width}), ({size}, {rank})")
                parts.append((to_lanes(a.float(), dtype), to_lanes(b.float().t() * scale, dtype)))
            row.append(parts)
        layers.append(row)
    if unused:
        raise AdapterError(f"{path}: weights this base model has no place for, e.g. {sorted(unused)[:3]}")
    return rank, layers


def target_module(model: nn.Module, target: str) -> nn.Module:
    """The first layer's module `target`. Layers may differ (Jamba's attention or Mamba, dense MLP
    or experts): a layer without the target keeps zeros there, which no forward reads."""
    for layer in model.model.layers:
        try:
            return layer.get_submodule(target)
        except AttributeError:
            continue
    raise AttributeError(f"no layer has {target}")


def part_sizes(model: nn.Module, target: str) -> list[int]:
    return family_of(model).part_sizes(model.config, target, target_module(model, target).out_features)


@dataclass
class HostAdapter:
    """One adapter, stacked per target the way a lane holds it: A as (layers, parts, r, in), B^T
    (scale folded in) per part as (layers, r, part's out)."""
    rank: int
    a: list[torch.Tensor]
    bt: list[list[torch.Tensor]]


def host_adapter(ref: AdapterRef, model: nn.Module, dtype: torch.dtype, pin: bool) -> HostAdapter:
    rank, layers = read_adapter(Path(ref.path), model, dtype)
    a, bt = [], []
    for t in range(len(layers[0])):
        a.append(torch.stack([torch.stack([pa for pa, _ in row[t]]) for row in layers]))
        bt.append([torch.stack([row[t][p][1] for row in layers]) for p in range(len(layers[0][t]))])
    if pin:  # page-locked, so the copy into a GPU lane need not wait for it
        a, bt = [x.pin_memory() for x in a], [[x.pin_memory() for x in parts] for parts in bt]
    return HostAdapter(rank, a, bt)


class ResidentAdapters:
    """Up to `capacity` adapters in host memory, least recently used first; an adapter pinned (its
    lane in use) is never evicted, so the store may hold more while every one is pinned.

    The engine thread calls everything here; one background thread, started on the first miss,
    does the reading. A lock guards the few dicts both touch, never a file read."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, capacity: int, pin: bool = False):
        self.model, self.dtype, self.capacity, self.pin_host = model, dtype, capacity, pin
        self._resident: OrderedDict[str, HostAdapter] = OrderedDict()  # LRU first
        self._pins: dict[str, int] = {}
        self._pending: set[str] = set()              # queued for the background thread
        self._failed: dict[str, AdapterError] = {}   # background failures, raised once by `request`
        self._lock = threading.Lock()
        self._queue: queue.Queue[AdapterRef | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._resident)

    def __contains__(self, key: str) -> bool:
        return key in self._resident

    def request(self, ref: AdapterRef) -> bool:
        """True when `ref` is resident; otherwise queue its load (once) and answer False. A load
        that failed raises its AdapterError here, once: the next request tries again."""
        with self._lock:
            if ref.key in self._resident:
                self._resident.move_to_end(ref.key)
                return True
            if ref.key in self._failed:
                raise self._failed.pop(ref.key)
            if ref.key not in self._pending:
                self._pending.add(ref.key)
                self._start()
                self._queue.put(ref)
        return False

    def get(self, ref: AdapterRef) -> HostAdapter:
        """`ref`'s weights, read here and now when not resident (the fallback that stalls a step)."""
        with self._lock:
            if ref.key in self._failed:
                raise self._failed.pop(ref.key)
            adapter = self._resident.get(ref.key)
            if adapter is not None:
                self._resident.move_to_end(ref.key)
                return adapter
        adapter = host_adapter(ref, self.model, self.dtype, self.pin_host)
        with self._lock:
            return self._insert(ref.key, adapter)

    def forget(self, key: str) -> None:
        """Drop `key` (its model deleted): a lane holding it keeps its copy until reused, which no
        request for the deleted model will ask for. Any thread."""
        with self._lock:
            self._resident.pop(key, None)
            self._failed.pop(key, None)

    def pin(self, key: str) -> None:
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        with self._lock:
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]
            self._evict()

    def close(self) -> None:
        """Stop the background thread (after the load in hand, if any)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="adapter-loader", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        # one thread: an OpenMP team here, alive beside the engine's, was measured to slow the
        # engine thread's parallel regions ~2.5x on this machine
        torch.set_num_threads(1)
        while (ref := self._queue.get()) is not None:
            try:
                adapter, error = host_adapter(ref, self.model, self.dtype, self.pin_host), None
            except AdapterError as exc:
                adapter, error = None, exc
            except Exception as exc:  # noqa: BLE001 - any failure must reach the request, not kill the thread
                adapter, error = None, AdapterError(f"{ref.path}: {type(exc).__name__}: {exc}")
            with self._lock:
                self._pending.discard(ref.key)
                if error is not None:
                    self._failed[ref.key] = error
                else:
                    self._insert(ref.key, adapter)

    def _insert(self, key: str, adapter: HostAdapter) -> HostAdapter:
        """Under the lock: keep `adapter` as the most recently used (a copy already resident wins)."""
        adapter = self._resident.setdefault(key, adapter)
        self._resident.move_to_end(key)
        self._evict()
        return adapter

    def _evict(self) -> None:
        """Under the lock: drop the least recently used unpinned adapters beyond capacity, never the
        newest (while all the others are pinned, the store holds one more)."""
        unpinned = [key for key in list(self._resident)[:-1] if key not in self._pins]
        for key in unpinned[:max(0, len(self._resident) - self.capacity)]:
            del self._resident[key]
