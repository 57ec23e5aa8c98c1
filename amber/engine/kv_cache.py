"""The one owner of KV memory: fixed slots, one per running sequence.

Keys and values for every layer live in two preallocated tensors of shape
(layers, slots, kv_heads, max_len, head_dim). A sequence holds a slot from admission to finish;
`copy` clones a prompt's cache into the slots of its sibling samples (numResults) so the prompt is
computed once. The tensors start zeroed: attention masks positions past a row's length, but a
masked weight times a NaN left in uninitialised memory would still be NaN.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self._free = list(range(slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return self._free.pop()

    def release(self, slot: int) -> None:
        assert slot not in self._free, f"slot {slot} released twice"
        self._free.append(slot)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Give `dst` the first `length` positions of `src` (a shared prompt)."""
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]

    def write_and_read(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, seq, kv_heads, head_dim) at each row's positions, then return each
        row's keys and values for positions [0, max position] as (batch, kv_heads, ctx, head_dim)."""
        rows = slots.unsqueeze(1)  # (batch, 1) broadcasts against positions (batch, seq)
        self.keys[layer, rows, :, positions] = k.to(self.keys.dtype)
        self.values[layer, rows, :, positions] = v.to(self.values.dtype)
        context = int(positions.max()) + 1
        if slots.numel() == 1:  # a view, no copy, for the single-sequence case
            s = int(slots[0])
            return self.keys[layer, s:s + 1, :, :context], self.values[layer, s:s + 1, :, :context]
        return self.keys[layer, slots, :, :context], self.values[layer, slots, :, :context]
