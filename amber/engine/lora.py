"""LoRA adapters served per batch row: many custom models on one frozen base, in one batch.

An adapter is a standard PEFT directory (adapter_config.json + adapter_model.safetensors). Its
weights are never merged into the base: each linear layer computes W x as usual, and rows that
have an adapter add (alpha / r) B A x on top, as LoRAX and S-LoRA do. So a batch can mix custom
models and the base model, and a row without an adapter computes exactly what the base computes.

`AdapterSlots` owns the loaded adapters: slot 0 is "no adapter", slots 1.. hold adapters in least
recently used order, pinned while a request uses them. Which projections take adapters, and how
PEFT's module names map onto them, is the model family's declaration (models/, `lora_targets`,
`fused`). Adapters are stored per *fused* projection (Llama fuses q/k/v and gate/up): A holds the
parts' A matrices one after another, so one matmul serves q, k and v at once, and B^T (scale folded
in) is kept per part. A projection the adapter does not train gets zeros.

`LoraBatch` is one forward pass's view: the batch's adapters side by side (copied once per change
in which adapters the batch holds, so steady decoding copies nothing), and a mask that keeps each
row's own adapter. A projection then costs one matmul for A, the mask, and one matmul per part for
B, however many adapters the batch mixes. Measured, 8 decode rows over 4 adapters: per-adapter
matmuls cost 2x the base step (each tiny kernel costs ~20 us to launch here); this costs 1.4x.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from torch import nn

from amber.engine.models import family_of
from amber.engine.models.layers import lora_add
from amber.engine.types import AdapterRef

PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter directory that cannot be served on this base model."""


def read_adapter(path: Path, model: nn.Module, dtype: torch.dtype
                 ) -> tuple[int, list[list[list[tuple[torch.Tensor, torch.Tensor]]]]]:
    """A PEFT adapter: its rank, and per layer, target and part (q, k, v of a fused qkv...) the pair
    (A (r, in), B^T scaled (r, part's out)); zeros for parts the adapter does not train."""
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
            width, parts = _target(model, target).in_features, []
            for part, size in zip(family.hf_parts(model.config, target), _part_sizes(model, target)):
                stem = f"{PEFT_PREFIX}{family.hf_layers}.{i}.{part}"
                a, b = weights.get(f"{stem}.lora_A.weight"), weights.get(f"{stem}.lora_B.weight")
                unused -= {f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"}
                if a is None or b is None:
                    a, b = torch.zeros(rank, width), torch.zeros(size, rank)
                elif a.shape != (rank, width) or b.shape != (size, rank):
                    raise AdapterError(f"{path}: {stem} has shapes {tuple(a.shape)}, {tuple(b.shape)}; "
                                       f"this base needs ({rank}, {width}), ({size}, {rank})")
                parts.append((a.float().to(dtype), (b.float().t() * scale).to(dtype)))
            row.append(parts)
        layers.append(row)
    if unused:
        raise AdapterError(f"{path}: weights this base model has no place for, e.g. {sorted(unused)[:3]}")
    return rank, layers


def _target(model: nn.Module, target: str) -> nn.Module:
    """The first layer's module `target`. Layers may differ (Jamba's attention or Mamba, dense MLP
    or experts): a layer without the target keeps zeros there, which no forward reads."""
    for layer in model.model.layers:
        try:
            return layer.get_submodule(target)
        except AttributeError:
            continue
    raise AttributeError(f"no layer has {target}")


def _part_sizes(model: nn.Module, target: str) -> list[int]:
    return family_of(model).part_sizes(model.config, target, _target(model, target).out_features)


class AdapterSlots:
    """Loaded adapters, stacked per target over all layers: A as (slots, layers, parts, r_max, in),
    B^T per part as (slots, layers, r_max, part's out).

    Ranks differ between adapters: the stacks are padded with zeros to the largest rank loaded,
    which adds nothing to the result. Capacity should be at least the batch size, so every running
    row's adapter can be resident at once."""

    def __init__(self, model: nn.Module, capacity: int):
        self.model, self.capacity = model, capacity
        self.targets = family_of(model).lora_targets
        # the activations' dtype (fp32 beside int8 weights): bf16 adapters were measured slower here,
        # small bf16 matmuls plus the casts costing more than the bytes they save
        self.dtype = model.model.embed_tokens.weight.dtype
        self.device = model.model.embed_tokens.weight.device
        self._slots: OrderedDict[str, int] = OrderedDict()   # adapter key -> slot, LRU first
        self._pins: dict[int, int] = {}
        self.slots, self.rank = 0, 0            # allocated slots (slot 0 included) and padded rank
        self.a: list[torch.Tensor] = []         # [target] (slots, layers, parts, r, in); slot 0 stays zero
        self.bt: list[list[torch.Tensor]] = []  # [target][part] (slots, layers, r, out of the part)
        self._joined: tuple[tuple[int, ...], list, list] | None = None

    def acquire(self, ref: AdapterRef | None) -> int:
        """The slot holding `ref` (0 for none), loading it on first use; pinned until `release`."""
        if ref is None:
            return 0
        slot = self._slots.get(ref.key)
        if slot is None:
            slot = self._load(ref)
        self._slots.move_to_end(ref.key)
        self._pins[slot] = self._pins.get(slot, 0) + 1
        return slot

    def loaded(self) -> int:
        return len(self._slots)

    def in_use(self) -> int:
        """Slots pinned by running rows now (read from other threads: a copy, never the live dict)."""
        return sum(1 for pins in list(self._pins.values()) if pins)

    def release(self, slot: int) -> None:
        if slot:
            self._pins[slot] -= 1

    def _load(self, ref: AdapterRef) -> int:
        rank, layers = read_adapter(Path(ref.path), self.model, self.dtype)
        slot = self._free_slot()
        if rank > self.rank or slot >= self.slots:
            self._grow(slots=max(slot + 1, self.slots), rank=max(rank, self.rank))
        for t in range(len(self.targets)):
            self.a[t][slot].zero_()
            for bt in self.bt[t]:
                bt[slot].zero_()
            for i, row in enumerate(layers):
                for p, (a, bt) in enumerate(row[t]):
                    self.a[t][slot, i, p, :rank] = a.to(self.device)
                    self.bt[t][p][slot, i, :rank] = bt.to(self.device)
        self._slots[ref.key] = slot
        self._joined = None  # a slot's contents changed
        return slot

    def _free_slot(self) -> int:
        used = set(self._slots.values())
        for slot in range(1, self.capacity + 1):
            if slot not in used:
                return slot
        for key, slot in self._slots.items():  # least recently used first
            if not self._pins.get(slot):
                del self._slots[key]
                return slot
        raise AdapterError(f"all {self.capacity} adapter slots are in use")

    def _grow(self, slots: int, rank: int) -> None:
        """Reallocate the stacks for more slots and/or a larger rank, keeping what is loaded."""
        layers = len(self.model.model.layers)
        new_a, new_bt = [], []
        for t, target in enumerate(self.targets):
            sizes, width = _part_sizes(self.model, target), _target(self.model, target).in_features
            a = torch.zeros(slots, layers, len(sizes), rank, width, dtype=self.dtype, device=self.device)
            bts = [torch.zeros(slots, layers, rank, size, dtype=self.dtype, device=self.device) for size in sizes]
            if self.a:
                old = self.a[t]
                a[:old.shape[0], :, :, :old.shape[3]] = old
                for bt, old_bt in zip(bts, self.bt[t]):
                    bt[:old_bt.shape[0], :, :old_bt.shape[2]] = old_bt
            new_a.append(a)
            new_bt.append(bts)
        self.a, self.bt = new_a, new_bt
        self.slots, self.rank, self._joined = slots, rank, None

    def _join(self, adapters: tuple[int, ...]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Per target, the batch's adapters side by side: A as (layers, parts * n * r, in), part by
        part; B^T per part as (layers, n * r, out). One adapter is a view of its stacks; several are
        copied once and reused while the batch holds the same adapters (decode steps mostly do)."""
        if len(adapters) == 1:
            s = adapters[0]
            return [a[s].flatten(1, 2) for a in self.a], [[bt[s] for bt in bts] for bts in self.bt]
        if self._joined is None or self._joined[0] != adapters:
            index = torch.tensor(adapters, device=self.device)
            a = [stack.index_select(0, index).permute(1, 2, 0, 3, 4).flatten(1, 3).contiguous()
                 for stack in self.a]
            bt = [[stack.index_select(0, index).transpose(0, 1).flatten(1, 2).contiguous() for stack in bts]
                  for bts in self.bt]
            self._joined = adapters, a, bt
        return self._joined[1], self._joined[2]

    def batch(self, row_slots: list[int], seq: int) -> LoraBatch | None:
        """The LoRA work of one forward pass whose rows use `row_slots`; None when no row has an
        adapter (the base model's pass, untouched)."""
        adapters = tuple(sorted(set(row_slots) - {0}))
        if not adapters:
            return None
        a, bt = self._join(adapters)
        mask = None
        if len(adapters) > 1 or 0 in row_slots:
            # row i keeps only its own adapter's share of A x: (rows * seq, n * r), per part
            mask = torch.zeros(len(row_slots), seq, len(adapters), self.rank, dtype=self.dtype)
            for row, slot in enumerate(row_slots):
                if slot:
                    mask[row, :, adapters.index(slot)] = 1
            mask = mask.view(len(row_slots) * seq, -1).to(self.device)
        return LoraBatch(a, bt, mask)


@dataclass
class LoraBatch:
    """One forward pass's adapters: per target, A and B^T of the batch's adapters side by side, and
    the mask that gives each row its own adapter's share (None when every row has the same one)."""
    a: list[torch.Tensor]
    bt: list[list[torch.Tensor]]
    mask: torch.Tensor | None

    def add(self, layer: int, target: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus (scaled) B A x for every row that has an adapter; x (rows, in), y (rows, out).
        The arithmetic is layers.lora_add's, which Llama's scripted decode step runs too."""
        return lora_add(x, y, self.a[target][layer], self.bt[target], layer, self.mask)
