"""The one owner of KV memory: fixed slots, one per running sample, plus one staging slot.

Keys and values for every layer live in two preallocated tensors of shape
(layers, slots + 1, kv_heads, max_len, head_dim). Running samples occupy slots [0, n) with no holes
(the engine moves the last one into a freed slot), so a decode step reads every row's cache as one
view, without a gather. A prompt is prefilled into the staging slot (the last) and then copied into
the slots of its numResults samples: the prompt is computed once.

The tensors start zeroed: attention masks positions past a row's length, but a masked weight times
a NaN left in uninitialised memory would still be NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (layers, slots + 1, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.staging = slots  # index of the prefill slot
        self.dtype = dtype
        # per-layer views made once, since every layer of every step indexes them:
        # (slots, kv_heads, len, head_dim) to read, (slots, len, kv_heads, head_dim) to write
        self.layer_keys, self.layer_values = self.keys.unbind(0), self.values.unbind(0)
        self.token_keys = [k.transpose(1, 2) for k in self.layer_keys]
        self.token_values = [v.transpose(1, 2) for v in self.layer_values]

    @classmethod
    def for_layers(cls, states: list, slots: int, max_len: int, dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> KVCache:
        """The cache for a model whose layers keep `states` (its family's `layer_states`): today
        full-attention and sliding-window layers whose keys and values have one shape.

        A sliding-window layer keeps every position here, like a full one, and its attention mask
        hides what lies behind the window: so the prefix cache, numResults copies and slot moves
        treat all layers alike. Dropping the positions behind the window (the memory Gemma 3's
        local layers save) is left to the paged pool of a later issue. Recurrent layers will get
        their own owner beside this one, indexed by layer."""
        from amber.engine.models.family import FullAttention, SlidingWindow  # models import this module

        attention = (FullAttention, SlidingWindow)
        shapes = {(s.kv_heads, s.head_dim) for s in states if isinstance(s, attention)}
        if len(shapes) != 1 or not all(isinstance(s, attention) for s in states):
            raise NotImplementedError(f"layer states {sorted(set(map(repr, states)))}: only attention layers "
                                      "(full or sliding-window) of one shape are served yet")
        ((kv_heads, head_dim),) = shapes
        return cls(len(states), slots, kv_heads, max_len, head_dim, dtype, device)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Give `dst` the first `length` positions of `src`."""
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]

    def read_block(self, slot: int, start: int, stop: int) -> torch.Tensor:
        """Positions [start, stop) of a slot, every layer, as one new tensor (layers, 2, kv_heads, n, head_dim)."""
        return torch.stack([self.keys[:, slot, :, start:stop], self.values[:, slot, :, start:stop]], dim=1)

    def write_block(self, slot: int, start: int, block: torch.Tensor) -> None:
        stop = start + block.shape[3]
        self.keys[:, slot, :, start:stop] = block[:, 0]
        self.values[:, slot, :, start:stop] = block[:, 1]

    def batch(self, slots: torch.Tensor | slice, positions: torch.Tensor) -> BatchCache:
        """The view one forward pass uses; `slots` is a slice for rows in consecutive slots (read as
        a view, no copy), else a tensor (batch,). positions: (batch, seq)."""
        rows = (torch.arange(slots.start, slots.stop, device=positions.device) if isinstance(slots, slice)
                else slots)
        return BatchCache(self, slots, positions.shape, int(positions.max()) + 1,
                          (rows.unsqueeze(1), positions))


@dataclass
class BatchCache:
    """One forward pass's rows of the cache, worked out once rather than in every layer."""
    cache: KVCache
    slots: torch.Tensor | slice
    shape: torch.Size            # (batch, seq)
    context: int                 # max position + 1: how much of each slot attention reads
    where: tuple[torch.Tensor, torch.Tensor]  # (slot (batch, 1), position (batch, seq)) of each new token

    @property
    def dtype(self) -> torch.dtype:
        """The cache's: keys and values are stored in it."""
        return self.cache.dtype

    def write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (tokens, kv_heads, head_dim) in the cache's dtype, the rows' tokens one after
        another, at each row's positions, then return each row's keys and values for positions
        [0, context) as (batch, kv_heads, context, head_dim)."""
        cache, shape = self.cache, (*self.shape, *k.shape[1:])
        # one index_put_ per tensor on a (slot, position, head, dim) view: a decode step's hot path,
        # where Python's indexing syntax would parse the index tuple anew in every layer
        cache.token_keys[layer].index_put_(self.where, k.view(shape))
        cache.token_values[layer].index_put_(self.where, v.view(shape))
        # a slice of slots reads as a view; a tensor of slots gathers
        keys, values = cache.layer_keys[layer], cache.layer_values[layer]
        return keys[self.slots, :, :self.context], values[self.slots, :, :self.context]
