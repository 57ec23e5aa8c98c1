"""The one owner of KV memory: fixed slots, one per running sample, plus one staging slot.

Keys and values for every layer live in two preallocated tensors of shape
(layers, slots + 1, kv_heads, max_len, head_dim). Running samples occupy slots [0, n) with no holes
(the engine moves the last one into a freed slot), so a decode step reads every row's cache as one
view, without a gather. A prompt is prefilled into the staging slot (the last) and then copied into
the slots of its numResults samples: the prompt is computed once.

The tensors start zeroed: attention masks positions past a row's length, but a masked weight times
a NaN left in uninitialised memory would still be NaN.

Layers that keep a recurrent state instead (Jamba's Mamba mixers: family.Recurrent) have it here
too, per slot beside the keys and values (`RecurrentStates`), so that everything the engine does
to a slot (copy a prompt into numResults slots, move the last row into a freed slot) does it to
both. Keys and values then exist for the attention layers only: a model names its own layer and
the cache maps it (`attention_index`). A forward whose row starts at position 0 reads a zero state
for that row, whatever a finished or cancelled request left in the slot: keys and values need no
such reset, as positions past a row's length are masked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from amber.engine.models.family import Recurrent


class KVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu", *,
                 attention_index: list[int] | None = None, recurrent: RecurrentStates | None = None):
        """`layers` attention layers; `attention_index[i]`: model layer i's index among them (-1
        for a layer without keys and values), the identity when every layer is attention (Llama's
        fast decode path reads the per-layer lists below by model layer)."""
        self.attention_index = list(range(layers)) if attention_index is None else attention_index
        self.recurrent = recurrent
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
        """The cache for a model whose layers keep `states` (its family's `layer_states`): attention
        layers (full or sliding-window) whose keys and values have one shape, and recurrent states
        of one shape (if any layer has one).

        A sliding-window layer keeps every position here, like a full one, and its attention mask
        hides what lies behind the window: so the prefix cache, numResults copies and slot moves
        treat all attention layers alike. Dropping the positions behind the window (the memory
        Gemma 3's local layers save) is left to the paged pool of a later issue."""
        from amber.engine.models.family import FullAttention, Recurrent, SlidingWindow  # models import this module

        attention = [i for i, s in enumerate(states) if isinstance(s, (FullAttention, SlidingWindow))]
        recurrent = [i for i, s in enumerate(states) if isinstance(s, Recurrent)]
        shapes = {(states[i].kv_heads, states[i].head_dim) for i in attention}
        kinds = {states[i] for i in recurrent}
        if len(shapes) != 1 or len(kinds) > 1 or len(attention) + len(recurrent) != len(states):
            raise NotImplementedError(f"layer states {sorted(set(map(repr, states)))}: only attention layers "
                                      "(full or sliding-window) of one shape, and recurrent states of one "
                                      "shape, are served yet")
        ((kv_heads, head_dim),) = shapes
        index = [attention.index(i) if i in attention else -1 for i in range(len(states))]
        return cls(len(attention), slots, kv_heads, max_len, head_dim, dtype, device, attention_index=index,
                   recurrent=RecurrentStates(recurrent, *kinds, slots, device) if recurrent else None)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Give `dst` the first `length` positions of `src`, and its recurrent states."""
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]
        if self.recurrent is not None:
            self.recurrent.copy(src, dst)

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
        fresh = None if self.recurrent is None else (positions[:, :1] == 0).unsqueeze(-1)  # (batch, 1, 1)
        return BatchCache(self, slots, positions.shape, int(positions.max()) + 1,
                          (rows.unsqueeze(1), positions), fresh)


class RecurrentStates:
    """Each recurrent layer's states for every slot (the staging slot included), in fp32 whatever
    the activations' dtype (a bf16 input is held exactly; the scan runs in fp32, as transformers'
    does): conv (layers, slots + 1, *conv_shape) and ssm (layers, slots + 1, *ssm_shape)."""

    def __init__(self, layers: list[int], state: Recurrent, slots: int, device: str | torch.device):
        self.index = {layer: i for i, layer in enumerate(layers)}  # model layer -> index here
        self.conv = torch.zeros(len(layers), slots + 1, *state.conv_shape, device=device)
        self.ssm = torch.zeros(len(layers), slots + 1, *state.ssm_shape, device=device)

    def copy(self, src: int, dst: int) -> None:
        self.conv[:, dst] = self.conv[:, src]
        self.ssm[:, dst] = self.ssm[:, src]


@dataclass
class BatchCache:
    """One forward pass's rows of the cache, worked out once rather than in every layer."""
    cache: KVCache
    slots: torch.Tensor | slice
    shape: torch.Size            # (batch, seq)
    context: int                 # max position + 1: how much of each slot attention reads
    where: tuple[torch.Tensor, torch.Tensor]  # (slot (batch, 1), position (batch, seq)) of each new token
    fresh: torch.Tensor | None = None  # (batch, 1, 1): rows starting at position 0 (recurrent caches only)

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
        layer = cache.attention_index[layer]
        cache.token_keys[layer].index_put_(self.where, k.view(shape))
        cache.token_values[layer].index_put_(self.where, v.view(shape))
        # a slice of slots reads as a view; a tensor of slots gathers
        keys, values = cache.layer_keys[layer], cache.layer_values[layer]
        return keys[self.slots, :, :self.context], values[self.slots, :, :self.context]

    def read_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Recurrent layer `layer`'s conv and SSM states of the rows, (batch, *shape) fp32: zeros
        for a row that starts at position 0."""
        states = self.cache.recurrent
        i = states.index[layer]
        conv, ssm = states.conv[i][self.slots], states.ssm[i][self.slots]
        return torch.where(self.fresh, 0.0, conv), torch.where(self.fresh, 0.0, ssm)

    def write_state(self, layer: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        """Keep the rows' states after this pass's last token."""
        states = self.cache.recurrent
        i = states.index[layer]
        states.conv[i][self.slots] = conv
        states.ssm[i][self.slots] = ssm
