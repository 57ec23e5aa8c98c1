"""LoRA adapters served per batch row: many custom models on one frozen base, in one batch.

An adapter is a standard PEFT directory (adapter_config.json + adapter_model.safetensors). Its
weights are never merged into the base: each linear layer computes W x as usual, and rows that
have an adapter add (alpha / r) B A x on top, as LoRAX and S-LoRA do. So a batch can mix custom
models and the base model, and a row without an adapter computes exactly what the base computes.

Two layers. `lora_store.ResidentAdapters` keeps up to `resident` adapters in host memory (LRU),
read by a background thread. `AdapterSlots` owns the *lanes*: the device tensors the batch's
adapters live in, already side by side, so a step copies nothing. Lane 0 is "no adapter"; an
adapter entering the batch is copied into a free lane once, and a released lane keeps its adapter
as a cache, re-used without a copy, least recently used lanes overwritten first.

Which projections take adapters, and how PEFT's module names map onto them, is the model family's
declaration (models/, `lora_targets`, `fused`). Lanes are per *fused* projection (Llama fuses q/k/v
and gate/up): per target, A as (layers, parts, lanes, r, in), B^T (scale folded in) per part as
(layers, lanes * r, out). Ranks differ between adapters: lanes are padded with zeros to the largest
rank that entered one (re-allocated when a larger one arrives), which adds nothing to the result.

`LoraBatch` is what one forward pass reads. Where the compiled CPU op is loaded (paged_ops,
csrc/lora_rows.cpp) it is all the lanes and each row's lane: each row reads only its own adapter, and
the lanes beside quantized base weights are int8 with a scale per row, a quarter of fp32's bytes (a
decode step's LoRA cost over many adapters is reading them). Otherwise it is a
view over the lanes from the lowest to the highest the batch uses, with a mask that keeps each row's
own lane: a projection then costs one (batched over parts) matmul for A, the mask, and one matmul per
part for B, however many adapters the batch mixes, in the activations' dtype.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from amber.engine import paged_ops
from amber.engine.lora_store import (PEFT_PREFIX, AdapterError, HostAdapter, ResidentAdapters, part_sizes,
                                     read_adapter, target_module)
from amber.engine.models import family_of
from amber.engine.models.layers import lora_add
from amber.engine.quantize import QuantizedLinear
from amber.engine.types import AdapterRef

__all__ = ["PEFT_PREFIX", "AdapterError", "AdapterSlots", "LoraBatch", "read_adapter"]


def use_kernel(device: torch.device) -> bool:
    """Whether adapters on `device` go through the compiled per-row op (CPU, library loaded)."""
    return device.type == "cpu" and paged_ops.ensure()


class AdapterSlots:
    """The engine's adapters: `capacity` lanes (lane 0 included) over `resident` host-side adapters.

    Engine thread, per waiting request: `can_acquire(ref)` (starts a background load on a miss,
    raises a failed load's AdapterError once) until True, then `acquire(ref)` -> lane, pinned until
    `release(lane)`. `acquire` alone still works: it reads a missing adapter synchronously."""

    def __init__(self, model: nn.Module, capacity: int, resident: int = 128, dtype: torch.dtype | None = None):
        self.model, self.capacity = model, capacity
        self.targets = family_of(model).lora_targets
        self.device = model.model.embed_tokens.weight.device
        self.kernel = use_kernel(self.device)
        # the activations' dtype (fp32 beside int8 weights) without the compiled op: bf16 adapters
        # were measured slower in torch's small matmuls, the casts costing more than the bytes they
        # save. Where the base weights are quantized anyway the op reads int8 lanes, a scale per
        # row (a quarter of fp32's bytes: rows over many adapters are bound by reading them), at
        # fp32 accumulation; a float32 or bfloat16 model keeps lanes in its own dtype, so that its
        # rows stay PEFT's to that dtype's rounding (the exact mode's promise)
        quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
        self.dtype = dtype or (torch.int8 if self.kernel and quantized else model.activation_dtype)
        if self.dtype == torch.int8 and not self.kernel:
            raise ValueError("int8 adapter lanes need the compiled op (paged_ops)")
        self.tail = 4 if self.dtype == torch.int8 else 0   # int8 rows end in their fp32 scale
        self.store = ResidentAdapters(model, self.dtype, resident, pin=self.device.type == "cuda")
        self._lane_of: OrderedDict[str, int] = OrderedDict()  # adapter key -> lane, least recently used first
        self._keys: list[str | None] = [None] * capacity       # lane -> adapter key
        self._pins = [0] * capacity
        self.rank, self.copies = 0, 0   # lanes' padded rank; adapters copied into a lane so far
        self.a: list[torch.Tensor] = []          # [target] (layers, parts, lanes - 1, r, in); lane l at l - 1
        self.bt: list[list[torch.Tensor]] = []   # [target][part] (layers, (lanes - 1) * r, out of the part)
        self._views: tuple[tuple[int, int, int], list, list] | None = None
        self._mask: tuple[tuple, torch.Tensor] | None = None
        self._lanes: tuple[tuple, torch.Tensor] | None = None

    def request(self, ref: AdapterRef | None) -> bool:
        """True when `ref` can be placed in a lane without reading it (None: always); otherwise
        its background load is queued and this answers False. Raises a failed load's AdapterError,
        once."""
        return ref is None or ref.key in self._lane_of or self.store.request(ref)

    def can_acquire(self, ref: AdapterRef | None) -> bool:
        """`request(ref)`, and a lane for it: the one already holding it, or one not pinned."""
        return self.request(ref) and (ref is None or ref.key in self._lane_of or 0 in self._pins[1:])

    def acquire(self, ref: AdapterRef | None) -> int:
        """The lane holding `ref` (0 for none), copied in if needed (read first, synchronously, when
        not resident); pinned until `release`."""
        if ref is None:
            return 0
        lane = self._lane_of.get(ref.key)
        if lane is None:
            lane = self._place(ref.key, self.store.get(ref))
        self._lane_of.move_to_end(ref.key)
        if not self._pins[lane]:
            self.store.pin(ref.key)
        self._pins[lane] += 1
        return lane

    def release(self, lane: int) -> None:
        if lane:
            self._pins[lane] -= 1
            if not self._pins[lane]:  # used until now: the last lane to overwrite
                self._lane_of.move_to_end(self._keys[lane])
                self.store.unpin(self._keys[lane])

    def forget(self, key: str) -> None:
        """Drop a deleted adapter from host memory (ResidentAdapters.forget). Any thread."""
        self.store.forget(key)

    def loaded(self) -> int:
        """Adapters resident in host memory."""
        return len(self.store)

    def in_use(self) -> int:
        """Lanes pinned by running rows now (read from other threads: a copy, never the live list)."""
        return sum(1 for pins in list(self._pins) if pins)

    def close(self) -> None:
        self.store.close()

    def _place(self, key: str, adapter: HostAdapter) -> int:
        lane = self._free_lane()
        if self._keys[lane] is not None:
            del self._lane_of[self._keys[lane]]
        if adapter.rank > self.rank:
            self._grow(adapter.rank)
        i, r, blocking = lane - 1, adapter.rank, self.device.type != "cuda"
        for t in range(len(self.targets)):
            self.a[t][:, :, i, :r].copy_(adapter.a[t], non_blocking=not blocking)
            self.a[t][:, :, i, r:].zero_()
            for bt, host in zip(self.bt[t], adapter.bt[t]):
                lanes = bt.view(bt.shape[0], self.capacity - 1, self.rank, -1)  # (layers, lanes, r, out)
                lanes[:, i, :r].copy_(host, non_blocking=not blocking)
                lanes[:, i, r:].zero_()
        self._keys[lane], self._lane_of[key] = key, lane
        self.copies += 1
        return lane

    def _free_lane(self) -> int:
        """The lowest empty lane (keeping the batch's view short), else the least recently used
        unpinned one."""
        for lane in range(1, self.capacity):
            if self._keys[lane] is None:
                return lane
        for lane in self._lane_of.values():
            if not self._pins[lane]:
                return lane
        raise AdapterError(f"all {self.capacity - 1} adapter lanes are in use")

    def _grow(self, rank: int) -> None:
        """Reallocate the lanes for a larger rank, keeping what they hold. Lanes are allocated
        empty, so memory is paid only for lanes that hold an adapter: lanes fill from the lowest up
        (`_free_lane`), a batch views lanes only up to its highest, and `_place` writes all of its
        lane (zeros past the adapter's rank)."""
        layers, lanes, old = len(self.model.model.layers), self.capacity - 1, self.rank
        held = sum(1 for key in self._keys[1:] if key is not None)  # lanes 1..held hold adapters
        new_a, new_bt = [], []
        for t, target in enumerate(self.targets):
            sizes, width = part_sizes(self.model, target), target_module(self.model, target).in_features
            a = torch.empty(layers, len(sizes), lanes, rank, width + self.tail, dtype=self.dtype, device=self.device)
            bts = [torch.empty(layers, lanes * rank, size + self.tail, dtype=self.dtype, device=self.device)
                   for size in sizes]
            if held:
                a[:, :, :held, :old] = self.a[t][:, :, :held]
                a[:, :, :held, old:] = 0
                for bt, previous in zip(bts, self.bt[t]):
                    view = bt.view(layers, lanes, rank, -1)
                    view[:, :held, :old] = previous.view(layers, lanes, old, -1)[:, :held]
                    view[:, :held, old:] = 0
            new_a.append(a)
            new_bt.append(bts)
        self.a, self.bt, self.rank = new_a, new_bt, rank
        self._views = self._mask = None

    def _lanes_view(self, lo: int, hi: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Per target, lanes lo..hi side by side, as views: A (layers, parts, k * r, in), B^T per
        part (layers, k * r, out)."""
        key = (lo, hi, self.rank)
        if self._views is None or self._views[0] != key:
            r, i0, i1 = self.rank, lo - 1, hi
            a = [lanes[:, :, i0:i1].flatten(2, 3) for lanes in self.a]
            bt = [[lanes[:, i0 * r:i1 * r] for lanes in bts] for bts in self.bt]
            self._views = key, a, bt
        return self._views[1], self._views[2]

    def batch(self, row_lanes: list[int], seq: int) -> LoraBatch | None:
        """The LoRA work of one forward pass whose rows use `row_lanes`; None when no row has an
        adapter (the base model's pass, untouched)."""
        used = set(row_lanes) - {0}
        if not used:
            return None
        if self.kernel:
            key = (tuple(row_lanes), seq)
            if self._lanes is None or self._lanes[0] != key:
                # index into the lanes as stored (lane l at l - 1); -1: no adapter
                lanes = torch.tensor(row_lanes, dtype=torch.int32).repeat_interleave(seq) - 1
                self._lanes = key, lanes.to(self.device)
            return LoraBatch(self.a, self.bt, None, self._lanes[1])
        lo, hi = min(used), max(used)
        a, bt = self._lanes_view(lo, hi)
        if len(used) == 1 and 0 not in row_lanes:
            return LoraBatch(a, bt, None)
        key = (tuple(row_lanes), seq, lo, hi, self.rank)
        if self._mask is None or self._mask[0] != key:
            # row i keeps only its own lane's share of A x: (rows * seq, k * r)
            own = torch.tensor(row_lanes)[:, None] == torch.arange(lo, hi + 1)[None]   # (rows, lanes)
            mask = own.to(self.dtype)[:, None, :, None].expand(len(row_lanes), seq, hi - lo + 1, self.rank)
            self._mask = key, mask.reshape(len(row_lanes) * seq, -1).to(self.device)
        return LoraBatch(a, bt, self._mask[1])


@dataclass
class LoraBatch:
    """One forward pass's adapters. With `lanes` (the compiled op's): per target, A (layers, parts,
    lanes, r, in) and B^T per part (layers, lanes * r, out) of all lanes, and each row's lane (rows,)
    int32, -1 for none. Without: per target, A (layers, parts, k * r, in) and B^T per part (layers,
    k * r, out) of k lanes side by side (views), and the mask (rows, k * r) that gives each row its
    own lane's share (None when every row has the same one)."""
    a: list[torch.Tensor]
    bt: list[list[torch.Tensor]]
    mask: torch.Tensor | None
    lanes: torch.Tensor | None = None

    def add(self, layer: int, target: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus (scaled) B A x for every row that has an adapter; x (rows, in), y (rows, out).
        The arithmetic is layers.lora_add's, which Llama's scripted decode step runs too."""
        return lora_add(x, y, self.a[target][layer], self.bt[target], layer, self.mask, self.lanes)
