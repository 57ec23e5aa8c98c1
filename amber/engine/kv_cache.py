"""The one owner of KV memory: a pool of fixed-size blocks, and a block table per sequence slot.

Keys and values of every attention layer live in two pools of shape
(layers, blocks * block_size, kv_heads, head_dim): token slot t of block b is row b * block_size + t.
A sequence slot (one running sample, plus one staging slot for long prompts) holds a list of
blocks, its block table; position p of the slot lives in block table[p // block_size], row p %
block_size. Memory therefore follows the tokens in use, not slots x context:

- The pools are allocated empty (`torch.empty`: the OS backs a page only once it is written),
  and blocks are handed out lowest id first, so resident memory grows with the most blocks ever in
  use at once. The prefix cache keeps its blocks in memory that is already resident: past a floor
  of its own, it gives back its least recently used block before the pool touches a new one. A
  block is zeroed when it is handed out: attention reads positions past a row's length under a
  mask, and a masked weight times a NaN left in never-written memory would still be NaN.
- Blocks are reference-counted. `fork` gives a sample the prompt's blocks without copying them
  (numResults samples, and prefix-cache hits through `attach`); a shared block is copied only when
  a holder is about to write into it (`prepare`: copy-on-write, which happens at most once per
  sample, at the prompt's last, partly filled block: full blocks are never written again).
- When no block is free, `evict` (the prefix cache's: it drops blocks only it holds) is asked
  first; then `PoolExhausted` is raised, and the engine preempts a request (engine.py).

A forward pass reads the cache through `batch(slots, positions)` (`BatchCache`): the flat rows its
new tokens are written to, and, per row, the flat rows of its positions [0, context) (a gather) or,
for a decode step where the compiled kernel is loaded (paged_ops.py), the block tables themselves,
so that attention reads the blocks in place.

Layers that keep a recurrent state instead (Jamba's Mamba mixers: family.Recurrent) have it here
too, per sequence slot (`RecurrentStates`): a state is one fixed-size tensor per layer, which
`fork` and `move` copy. Keys and values then exist for the attention layers only: a model names its
own layer and the cache maps it (`attention_index`). A forward whose row starts at position 0 reads
a zero state for that row, whatever a finished or cancelled request left in the slot.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from amber.engine import paged_ops

if TYPE_CHECKING:
    from amber.engine.models.family import Recurrent

BLOCK_SIZE = 16  # tokens per block (vLLM's default): the prefix cache's granularity too


class PoolExhausted(Exception):
    """No free block, even after the prefix cache gave back what it alone held."""


class KVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu", *,
                 attention_index: list[int] | None = None, recurrent: RecurrentStates | None = None,
                 blocks: int | None = None, block_size: int = BLOCK_SIZE):
        """`layers` attention layers; `slots` sequence slots plus one staging slot, each up to
        `max_len` positions; `blocks` in the pool (default: enough for every slot at max_len, as
        tests and offline work want; the engine passes its memory budget). `attention_index[i]`:
        model layer i's index among the attention layers (-1 for a layer without keys and values),
        the identity when every layer is attention."""
        self.attention_index = list(range(layers)) if attention_index is None else attention_index
        self.recurrent = recurrent
        self.block_size, self.dtype, self.device = block_size, dtype, torch.device(device)
        self.max_blocks = -(-max_len // block_size)  # per slot
        self.num_blocks = blocks if blocks is not None else (slots + 1) * self.max_blocks
        shape = (layers, self.num_blocks * block_size, kv_heads, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.layer_keys, self.layer_values = list(self.keys.unbind(0)), list(self.values.unbind(0))
        self.staging = slots  # the slot a long prompt is prefilled in
        self.tables = torch.zeros(slots + 1, self.max_blocks, dtype=torch.int32, device=device)
        self.slot_blocks: list[list[int]] = [[] for _ in range(slots + 1)]
        self.refs = [0] * self.num_blocks
        self._free = list(range(self.num_blocks))  # a heap: the lowest id first keeps memory compact
        self.high_water = 0                         # the most blocks ever handed out at once
        self.backed = 0                             # blocks [0, backed) were handed out: their memory is resident
        self.evict: Callable[[bool], bool] | None = None  # frees a block held only by the prefix cache (_take)
        # decode steps read blocks in place by the compiled kernel where it was built (CPU only)
        self.kernel = paged_ops.ensure() and self.device.type == "cpu"

    @classmethod
    def for_layers(cls, states: list, slots: int, max_len: int, dtype: torch.dtype,
                   device: str | torch.device = "cpu", blocks: int | None = None) -> KVCache:
        """The cache for a model whose layers keep `states` (its family's `layer_states`): attention
        layers (full or sliding-window) whose keys and values have one shape, and recurrent states
        of one shape (if any layer has one).

        A sliding-window layer keeps every position here, like a full one, and its attention hides
        what lies behind the window: so forks and the prefix cache treat all attention layers
        alike. Freeing the blocks behind the window (the memory Gemma 3's local layers could save)
        would need per-layer block tables; not done."""
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
                   recurrent=RecurrentStates(recurrent, *kinds, slots, device) if recurrent else None,
                   blocks=blocks)

    @staticmethod
    def bytes_per_token(states: list, dtype: torch.dtype) -> int:
        """Keys and values of one position over every attention layer of `states`."""
        attention = [s for s in states if hasattr(s, "kv_heads")]
        return sum(2 * s.kv_heads * s.head_dim for s in attention) * torch.finfo(dtype).bits // 8

    # ---- blocks ----
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def _take(self) -> int:
        """The lowest free block, memory already resident first: before a block past every one ever
        handed out is touched, the prefix cache may give back its least recently used block
        (`evict(False)`: only while it holds more than its floor), and when no block is free at all
        it gives back any block it alone holds (`evict(True)`)."""
        if self.evict is not None and (not self._free or self._free[0] >= self.backed):
            self.evict(False)
        while not self._free:
            if self.evict is None or not self.evict(True):
                raise PoolExhausted(f"all {self.num_blocks} KV blocks of {self.block_size} positions are in use")
        block = heapq.heappop(self._free)
        self.backed = max(self.backed, block + 1)
        rows = slice(block * self.block_size, (block + 1) * self.block_size)
        self.keys[:, rows].zero_()
        self.values[:, rows].zero_()
        self.refs[block] = 1
        self.high_water = max(self.high_water, self.num_blocks - len(self._free))
        return block

    def hold(self, block: int) -> None:
        self.refs[block] += 1

    def drop(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            heapq.heappush(self._free, block)

    def _set(self, slot: int, i: int, block: int) -> None:
        blocks = self.slot_blocks[slot]
        if i == len(blocks):
            blocks.append(block)
        else:
            blocks[i] = block
        self.tables[slot, i] = block

    # ---- sequence slots ----
    def prepare(self, slot: int, start: int, stop: int) -> None:
        """Make positions [start, stop) of `slot` writable: blocks handed out where the table has
        none, and a block shared with another holder copied first (copy-on-write). Raises
        PoolExhausted when a block is needed and none is free (the blocks taken so far stay)."""
        if stop > self.max_blocks * self.block_size:
            raise ValueError(f"position {stop - 1} lies past the slot's {self.max_blocks * self.block_size}")
        blocks, bs = self.slot_blocks[slot], self.block_size
        for i in range(start // bs, -(-stop // bs)):
            if i >= len(blocks):
                self._set(slot, i, self._take())
            elif self.refs[blocks[i]] > 1:
                old, new = blocks[i], self._take()
                rows, to = slice(old * bs, (old + 1) * bs), slice(new * bs, (new + 1) * bs)
                self.keys[:, to] = self.keys[:, rows]
                self.values[:, to] = self.values[:, rows]
                self.drop(old)
                self._set(slot, i, new)

    def fork(self, src: int, dst: int, length: int) -> None:
        """Give `dst` (empty) the first `length` positions of `src` by sharing their blocks, and
        src's recurrent states by copy."""
        assert not self.slot_blocks[dst], "fork into an empty slot"
        for i, block in enumerate(self.slot_blocks[src][:self.blocks_for(length)]):
            self.hold(block)
            self._set(dst, i, block)
        if self.recurrent is not None:
            self.recurrent.copy(src, dst)

    def attach(self, slot: int, blocks: list[int]) -> None:
        """Start an empty slot with `blocks` (a prefix-cache hit), shared."""
        assert not self.slot_blocks[slot], "attach to an empty slot"
        for i, block in enumerate(blocks):
            self.hold(block)
            self._set(slot, i, block)

    def move(self, src: int, dst: int) -> None:
        """Hand src's blocks (and recurrent states) to the empty slot `dst`; src is left empty."""
        assert not self.slot_blocks[dst], "move into an empty slot"
        self.slot_blocks[dst], self.slot_blocks[src] = self.slot_blocks[src], []
        self.tables[dst] = self.tables[src]
        if self.recurrent is not None:
            self.recurrent.copy(src, dst)

    def free(self, slot: int) -> None:
        """Let go of every block of `slot`."""
        for block in self.slot_blocks[slot]:
            self.drop(block)
        self.slot_blocks[slot] = []

    def blocks_of(self, slot: int) -> list[int]:
        return self.slot_blocks[slot]

    def _rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat pool rows of `positions` (batch, n) in the slots `slots` (batch,)."""
        tables = self.tables[slots].long()
        return tables.gather(1, positions // self.block_size) * self.block_size + positions % self.block_size

    def batch(self, slots: torch.Tensor | slice, positions: torch.Tensor) -> BatchCache:
        """The view one forward pass uses: rows in `slots` (a tensor (batch,), or a slice of
        consecutive slots), new tokens at `positions` (batch, seq), each row's positions
        consecutive. Makes the positions writable first (`prepare`, which the engine has usually
        done already)."""
        rows = (torch.arange(slots.start, slots.stop, device=self.device) if isinstance(slots, slice)
                else slots.to(self.device))
        starts, stops = positions[:, 0].tolist(), (positions[:, -1] + 1).tolist()
        for slot, start, stop in zip(rows.tolist(), starts, stops):
            self.prepare(slot, start, stop)
        context = max(stops)
        fresh = None if self.recurrent is None else (positions[:, :1] == 0).unsqueeze(-1)  # (batch, 1, 1)
        kernel = positions.shape[1] == 1 and self.kernel
        return BatchCache(self, rows, positions.shape, context, self._rows(rows, positions).flatten(),
                          positions[:, -1] + 1, fresh, kernel)


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
    slots: torch.Tensor          # (batch,) the rows' sequence slots
    shape: torch.Size            # (batch, seq)
    context: int                 # max position + 1: how many positions attention reads per row
    write_rows: torch.Tensor     # (batch * seq,) flat pool row of each new token
    lengths: torch.Tensor        # (batch,) each row's last new position + 1
    fresh: torch.Tensor | None = None  # (batch, 1, 1): rows starting at position 0 (recurrent caches only)
    kernel: bool = False         # decode step with paged_ops' kernel: attention reads blocks in place
    _read_rows: torch.Tensor | None = None
    _tables: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The cache's: keys and values are stored in it."""
        return self.cache.dtype

    @property
    def read_rows(self) -> torch.Tensor:
        """(batch * context,) flat pool rows of each row's positions [0, context)."""
        if self._read_rows is None:
            positions = torch.arange(self.context, device=self.slots.device).expand(len(self.slots), -1)
            self._read_rows = self.cache._rows(self.slots, positions).flatten()
        return self._read_rows

    @property
    def decode_rows(self) -> torch.Tensor:
        """What layers.paged_attend takes as `read_rows`: the gather's rows, or, where the kernel
        reads the blocks in place, any tensor (none is gathered)."""
        return self.lengths if self.kernel else self.read_rows

    @property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' block tables (batch, max_blocks) int32 and lengths (batch,) int32: the kernel's."""
        if self._tables is None:
            self._tables = self.cache.tables[self.slots], self.lengths.to(torch.int32)
        return self._tables

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (tokens, kv_heads, head_dim), in the cache's dtype, at the new tokens' rows."""
        cache = self.cache
        layer = cache.attention_index[layer]
        cache.layer_keys[layer].index_copy_(0, self.write_rows, k)
        cache.layer_values[layer].index_copy_(0, self.write_rows, v)

    def write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (tokens, kv_heads, head_dim) in the cache's dtype, the rows' tokens one after
        another, at each row's positions, then return each row's keys and values for positions
        [0, context) as (batch, kv_heads, context, head_dim): gathered from its blocks."""
        self.write(layer, k, v)
        cache, index, batch = self.cache, self.cache.attention_index[layer], self.shape[0]
        keys = cache.layer_keys[index].index_select(0, self.read_rows)
        values = cache.layer_values[index].index_select(0, self.read_rows)
        shape = (batch, self.context, *keys.shape[1:])
        return keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)

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
