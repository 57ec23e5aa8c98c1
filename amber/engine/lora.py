"""LoRA adapters served per batch row: many custom models on one frozen base, in one batch.

An adapter is a standard PEFT directory (adapter_config.json + adapter_model.safetensors). Its
weights are never merged into the base: each linear layer computes W x as usual, and rows that
have an adapter add (alpha / r) B A x on top, as LoRAX and S-LoRA do. So a batch can mix custom
models and the base model, and a row without an adapter computes exactly what the base computes.

`AdapterSlots` owns the loaded adapters: slot 0 is "no adapter", slots 1.. hold adapters in least
recently used order, pinned while a request uses them. Adapters are stored per layer and per
*fused* projection (the model fuses q/k/v and gate/up): A is the parts' A matrices stacked (k*r, in),
and B^T is block-diagonal (k*r, out) with the scale folded in, so one pair of small matmuls serves
q, k and v at once. A projection the adapter does not train gets zero blocks.

`LoraBatch` is one forward pass's view: which rows use which slot. Rows of the same adapter are
computed together (one pair of matmuls per adapter, per projection), reading each adapter's weights
once per step however many rows use it; a contiguous run of rows is a view, no gather.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from amber.engine.model import FUSED, LORA_TARGETS as TARGETS, LlamaForCausalLM
from amber.engine.types import AdapterRef

PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter directory that cannot be served on this base model."""


def _parts(target: str) -> tuple[str, ...]:
    return FUSED.get(target, (target,))


def read_adapter(path: Path, model: LlamaForCausalLM, dtype: torch.dtype
                 ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """A PEFT adapter as, per layer and per target, (A (k*r, in), B^T scaled (k*r, out))."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
        weights = load_file(path / "adapter_model.safetensors")
        rank = int(config["r"])
        scale = float(config["lora_alpha"]) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise AdapterError(f"{path}: not a readable PEFT adapter ({type(exc).__name__}: {exc})") from exc
    if config.get("use_dora") or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: only plain LoRA adapters are served (no DoRA)")
    unused = set(weights)
    layers = []
    for i, layer in enumerate(model.model.layers):
        row = []
        for target in TARGETS:
            linear = layer.get_submodule(target)
            a_parts, offset = [], 0
            sizes = _part_sizes(model, target)
            bt = torch.zeros(rank * len(sizes), linear.out_features, dtype=torch.float32)
            for p, (part, size) in enumerate(zip(_parts(target), sizes)):
                stem = f"{PEFT_PREFIX}model.layers.{i}.{part}"
                a, b = weights.get(f"{stem}.lora_A.weight"), weights.get(f"{stem}.lora_B.weight")
                unused -= {f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"}
                if a is None or b is None:
                    a = torch.zeros(rank, linear.in_features)
                elif a.shape != (rank, linear.in_features) or b.shape != (size, rank):
                    raise AdapterError(f"{path}: {stem} has shapes {tuple(a.shape)}, {tuple(b.shape)}; "
                                       f"this base needs ({rank}, {linear.in_features}), ({size}, {rank})")
                else:
                    bt[p * rank:(p + 1) * rank, offset:offset + size] = b.float().t() * scale
                a_parts.append(a.float())
                offset += size
            row.append((torch.cat(a_parts).to(dtype), bt.to(dtype)))
        layers.append(row)
    if unused:
        raise AdapterError(f"{path}: weights this base model has no place for, e.g. {sorted(unused)[:3]}")
    return layers


def _part_sizes(model: LlamaForCausalLM, target: str) -> list[int]:
    cfg = model.config
    if target == "self_attn.qkv_proj":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return [q, kv, kv]
    if target == "mlp.gate_up_proj":
        return [cfg.intermediate_size, cfg.intermediate_size]
    return [model.model.layers[0].get_submodule(target).out_features]


class AdapterSlots:
    """Loaded adapters, stacked per layer and target as (slots, k*r_max, in) and (slots, k*r_max, out).

    Ranks differ between adapters: the stacks are padded with zeros to the largest rank loaded,
    which adds nothing to the result. Capacity should be at least the batch size, so every running
    row's adapter can be resident at once."""

    def __init__(self, model: LlamaForCausalLM, capacity: int):
        self.model, self.capacity = model, capacity
        self.dtype = model.model.embed_tokens.weight.dtype
        self.device = model.model.embed_tokens.weight.device
        self._slots: OrderedDict[str, int] = OrderedDict()   # adapter key -> slot, LRU first
        self._pins: dict[int, int] = {}
        self.a: list[list[torch.Tensor]] = []   # [layer][target] (slots, k*r, in); slot 0 all zeros
        self.bt: list[list[torch.Tensor]] = []  # [layer][target] (slots, k*r, out)

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

    def release(self, slot: int) -> None:
        if slot:
            self._pins[slot] -= 1

    def _load(self, ref: AdapterRef) -> int:
        layers = read_adapter(Path(ref.path), self.model, self.dtype)
        slot = self._free_slot()
        rank = max(a.shape[0] for row in layers for a, _ in row)
        if not self.a or rank > self.a[0][0].shape[1] or slot >= self.a[0][0].shape[0]:
            self._grow(slots=max(slot + 1, self.a[0][0].shape[0] if self.a else 1), rows=rank)
        for stacks_a, stacks_bt, row in zip(self.a, self.bt, layers):
            for t, (a, bt) in enumerate(row):
                stacks_a[t][slot].zero_()
                stacks_bt[t][slot].zero_()
                stacks_a[t][slot, :a.shape[0]] = a.to(self.device)
                stacks_bt[t][slot, :bt.shape[0]] = bt.to(self.device)
        self._slots[ref.key] = slot
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

    def _grow(self, slots: int, rows: int) -> None:
        """Reallocate the stacks for more slots and/or a larger rank, keeping what is loaded."""
        rows = max(rows, self.a[0][0].shape[1] if self.a else 0)
        new_a, new_bt = [], []
        for i, layer in enumerate(self.model.model.layers):
            row_a, row_bt = [], []
            for t, target in enumerate(TARGETS):
                linear = layer.get_submodule(target)
                k = len(_parts(target))
                a = torch.zeros(slots, rows * k, linear.in_features, dtype=self.dtype, device=self.device)
                bt = torch.zeros(slots, rows * k, linear.out_features, dtype=self.dtype, device=self.device)
                if self.a:
                    old_a, old_bt = self.a[i][t], self.bt[i][t]
                    a[:old_a.shape[0], :old_a.shape[1]] = old_a
                    bt[:old_bt.shape[0], :old_bt.shape[1]] = old_bt
                row_a.append(a)
                row_bt.append(bt)
            new_a.append(row_a)
            new_bt.append(row_bt)
        self.a, self.bt = new_a, new_bt

    def batch(self, row_slots: list[int], seq: int) -> LoraBatch | None:
        """The LoRA work of one forward pass whose rows use `row_slots`; None when no row has an
        adapter (the base model's pass, untouched)."""
        if not any(row_slots):
            return None
        groups = []
        for slot in sorted(set(row_slots) - {0}):
            rows = [i for i, s in enumerate(row_slots) if s == slot]
            if rows == list(range(rows[0], rows[-1] + 1)):
                groups.append((slot, slice(rows[0] * seq, (rows[-1] + 1) * seq)))
            else:
                index = torch.tensor([r * seq + j for r in rows for j in range(seq)], device=self.device)
                groups.append((slot, index))
        return LoraBatch(self, groups)


@dataclass
class LoraBatch:
    slots: AdapterSlots
    groups: list[tuple[int, slice | torch.Tensor]]   # (adapter slot, its rows of the flattened batch)

    def add(self, layer: int, target: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y += (scaled) B A x for every row that has an adapter; x (batch, seq, in), y (batch, seq, out)."""
        a_stack, bt_stack = self.slots.a[layer][target], self.slots.bt[layer][target]
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for slot, rows in self.groups:
            a, bt = a_stack[slot], bt_stack[slot]
            if isinstance(rows, slice):
                y2[rows].addmm_(x2[rows] @ a.t(), bt)
            else:
                y2.index_add_(0, rows, (x2.index_select(0, rows) @ a.t()) @ bt)
        return y
