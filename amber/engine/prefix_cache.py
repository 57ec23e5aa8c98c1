"""Prompt prefixes computed once: KV blocks and prompt-token scores, reused by later requests.

A prompt (BOS first) is cut into blocks of `block_size` tokens. Block b holds the keys/values of
positions [b*bs, (b+1)*bs) and the scores of the tokens at positions b*bs+1 .. (b+1)*bs, so its key
covers every token up to and including position (b+1)*bs. A hit is copied into the staging slot
(slots are contiguous for the decode step; a copy costs far less than recomputing). Least recently
used blocks go first when the budget is full. Few-shot prompts, chat histories and repeated scoring
all start with the same blocks.

Off for families with recurrent layers (Jamba's Mamba mixers; the engine gives it no blocks): their
state after a block is one fixed-size tensor per layer that depends on every token before it, not
keys and values per position, so a hit would need the state saved at each block boundary, which a
chunked or batched prefill does not pass through (it keeps only the state after its last token).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from amber.engine.kv_cache import KVCache
from amber.engine.types import TokenLogprob


@dataclass
class Block:
    kv: torch.Tensor                       # (layers, 2, kv_heads, block, head_dim)
    scores: list[TokenLogprob] | None      # None when the prompt was not scored
    top_k: int                             # alternatives stored per score


class PrefixCache:
    def __init__(self, block_size: int = 32, max_blocks: int = 256):
        self.block_size, self.max_blocks = block_size, max_blocks
        self._blocks: OrderedDict[tuple, Block] = OrderedDict()

    def _keys(self, ids: list[int], namespace: str | None):
        """One key per full block that has a token after it: the token tuple up to that token,
        within `namespace` (the adapter that computed the block: None for the base model)."""
        bs = self.block_size
        for b in range((len(ids) - 1) // bs):
            yield b, (namespace, tuple(ids[:(b + 1) * bs + 1]))

    def load(self, ids: list[int], cache: KVCache, slot: int, need_scores: bool, top_k: int,
             namespace: str | None = None) -> tuple[int, list[TokenLogprob]]:
        """Copy the longest cached prefix of `ids` into `slot`. Returns how many positions are now
        filled and the scores of ids[1 : that + 1]."""
        filled, scores = 0, []
        for b, key in self._keys(ids, namespace):
            block = self._blocks.get(key)
            if block is None or (need_scores and (block.scores is None or block.top_k < top_k)):
                break
            self._blocks.move_to_end(key)
            cache.write_block(slot, b * self.block_size, block.kv)
            filled = (b + 1) * self.block_size
            if need_scores:
                scores += [TokenLogprob(t.token_id, t.logprob, t.raw_logprob, t.top[:top_k]) for t in block.scores]
        return filled, scores

    def store(self, ids: list[int], cache: KVCache, slot: int, scores: list[TokenLogprob] | None,
              top_k: int, namespace: str | None = None) -> None:
        """Keep the full blocks of a prefilled prompt. scores[i] belongs to ids[i + 1]."""
        if self.max_blocks == 0:  # turned off
            return
        bs = self.block_size
        for b, key in self._keys(ids, namespace):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            block_scores = scores[b * bs:(b + 1) * bs] if scores is not None else None
            self._blocks[key] = Block(cache.read_block(slot, b * bs, (b + 1) * bs), block_scores, top_k)
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)

    def __len__(self) -> int:
        return len(self._blocks)
