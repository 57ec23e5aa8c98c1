"""Prompt prefixes computed once: KV blocks of the pool, shared, and prompt-token scores.

A prompt (BOS first) is cut into the cache's blocks (kv_cache.BLOCK_SIZE tokens). Block b holds
the keys/values of positions [b*bs, (b+1)*bs) and the scores of the tokens at positions b*bs+1 ..
(b+1)*bs, so its key covers every token up to and including position (b+1)*bs: a block is kept
only when a token follows it, and a hit always leaves the prompt's last token to compute (its
logits start the completion). Keeping a block costs no copy: the prefix cache holds a reference
to the pool's block (kv_cache.KVCache.hold), and a hit attaches the same blocks to the new
request's slot. A kept block is full, and a sequence never writes into its full blocks again, so
no copy-on-write is ever needed for them.

The cache keeps at most `max_blocks` blocks, least recently used first out; and when the pool has
no free block, it gives back (`evict_one`) the least recently used block that no sequence holds.
Past `floor` blocks it also gives one back rather than let the pool back a block with new memory:
beyond the floor it lives in memory that running sequences once used, so a server's resident size
follows its peak load (plus the floor), not the load plus every prompt it has seen.
Few-shot prompts, chat histories and repeated scoring all start with the same blocks.

A prompt's last, partial block is kept too (a tail), under the tokens before it: a later prompt
that starts with the same full blocks takes the tail's positions as far as it agrees with them (one
less when it is scored: a position's score is about the token after it; never its own last token). The tail is shared like a full block until the new request writes into
it: KVCache.prepare copies a shared block before any write (copy-on-write), so the kept tail never
changes. A tail also keeps the logits that followed its prompt (fp32, a vocabulary's worth: 192 KB
for SmolLM2): the same prompt again computes nothing at all and gets those very logits, so the same
request answers the same, bit for bit (computing its last position alone would round differently
than inside the whole prompt's forward). A prompt that parts ways inside a tail computes the rest.

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
    block: int                             # the pool block
    scores: list[TokenLogprob] | None      # None when the prompt was not scored
    top_k: int                             # alternatives stored per score
    tokens: tuple[int, ...] = ()           # a tail's: the prompt's tokens at its positions (a full block: ())
    logits: torch.Tensor | None = None     # a tail's: the logits after the prompt's last token (fp32, vocab)


class PrefixCache:
    def __init__(self, cache: KVCache, max_blocks: int = 512, floor: int = 128):
        self.cache, self.block_size, self.max_blocks = cache, cache.block_size, max_blocks
        self.floor = min(floor, max_blocks)
        self._blocks: OrderedDict[tuple, Block] = OrderedDict()
        if max_blocks:
            cache.evict = self.evict_one

    def _keys(self, ids: list[int], namespace: str | None):
        """One key per full block that has a token after it: the token tuple up to that token,
        within `namespace` (the adapter that computed the block: None for the base model)."""
        bs = self.block_size
        for b in range((len(ids) - 1) // bs):
            yield b, (namespace, tuple(ids[:(b + 1) * bs + 1]))

    def load(self, ids: list[int], slot: int, need_scores: bool, top_k: int,
             namespace: str | None = None) -> tuple[int, list[TokenLogprob], torch.Tensor | None]:
        """Attach the longest cached prefix of `ids` to the empty `slot`. Returns how many
        positions are now filled, the scores of ids[1 : that + 1], and, when `ids` is a prompt
        kept whole (every position filled), the logits that followed it then (a copy)."""
        blocks, scores, keys = [], [], []
        usable = lambda block: not need_scores or (block.scores is not None and block.top_k >= top_k)
        for _, key in self._keys(ids, namespace):
            block = self._blocks.get(key)
            if block is None or not usable(block):
                break
            keys.append(key)
            blocks.append(block.block)
            if need_scores:
                scores += [TokenLogprob(t.token_id, t.logprob, t.raw_logprob, t.top[:top_k]) for t in block.scores]
        filled = len(blocks) * self.block_size
        key = self._tail_key(ids, len(blocks), namespace)
        tail = self._blocks.get(key)
        logits = None
        if tail is not None and usable(tail):
            rest = ids[filled:]
            if tail.logits is not None and tail.tokens == tuple(rest):
                # the same prompt again: nothing to compute, and the very logits it got then, so
                # that the same request answers the same, bit for bit
                same, logits = len(rest), tail.logits.clone()
            else:
                same = next((i for i, (a, b) in enumerate(zip(tail.tokens, rest)) if a != b),
                            min(len(tail.tokens), len(rest)))
                if need_scores:  # a position's score is about the token after it: that one must agree too
                    same -= 1
                same = min(same, len(rest) - 1)  # never the prompt's last position: its logits start the answer
            if same > 0:
                keys.append(key)
                blocks.append(tail.block)
                if need_scores:  # (a tail scores all its positions but the last: the prompt's own)
                    scores += [TokenLogprob(t.token_id, t.logprob, t.raw_logprob, t.top[:top_k])
                               for t in tail.scores[:same]]
                filled += same
        self._touch(keys)
        self.cache.attach(slot, blocks)
        return filled, scores, logits

    def store(self, ids: list[int], slot: int, scores: list[TokenLogprob] | None, top_k: int,
              namespace: str | None = None, logits: torch.Tensor | None = None) -> None:
        """Keep the blocks of a prefilled prompt in `slot`. scores[i] belongs to ids[i + 1];
        `logits`: what followed the prompt's last token (kept with its tail, copied)."""
        if self.max_blocks == 0:  # turned off
            return
        bs, blocks, keys = self.block_size, self.cache.blocks_of(slot), []
        for b, key in self._keys(ids, namespace):
            keys.append(key)
            kept = self._blocks.get(key)
            if kept is not None and (scores is None or (kept.scores is not None and kept.top_k >= top_k)):
                continue
            if kept is not None:  # a better-scored copy of the same block replaces it
                self.cache.drop(kept.block)
            self.cache.hold(blocks[b])
            block_scores = scores[b * bs:(b + 1) * bs] if scores is not None else None
            self._blocks[key] = Block(blocks[b], block_scores, top_k)
        self._store_tail(ids, blocks, scores, top_k, namespace, keys, logits)
        self._touch(keys)
        while len(self._blocks) > self.max_blocks:
            self.cache.drop(self._blocks.popitem(last=False)[1].block)

    def _tail_key(self, ids: list[int], full: int, namespace: str | None) -> tuple:
        """The key of the tail that follows `full` blocks of `ids`: the tokens before it."""
        return ("tail", namespace, tuple(ids[:full * self.block_size]))

    def _store_tail(self, ids: list[int], blocks: list[int], scores: list[TokenLogprob] | None, top_k: int,
                    namespace: str | None, keys: list[tuple], logits: torch.Tensor | None) -> None:
        """Keep the prompt's positions past its last kept full block, unless a kept tail covers
        them already. Its scores are those of all but the last position (whose score would be
        about the token after the prompt)."""
        bs = self.block_size
        full = (len(ids) - 1) // bs
        tokens = tuple(ids[full * bs:])
        if len(tokens) < 2 or full >= len(blocks):
            return
        key = self._tail_key(ids, full, namespace)
        kept = self._blocks.get(key)
        if kept is not None and kept.tokens[:len(tokens)] == tokens and (
                scores is None or (kept.scores is not None and kept.top_k >= top_k)):
            if kept.logits is None and kept.tokens == tokens and logits is not None:
                kept.logits = logits.detach().clone()
            keys.append(key)
            return
        if kept is not None:
            self.cache.drop(kept.block)
        self.cache.hold(blocks[full])
        tail_scores = scores[full * bs:len(ids) - 1] if scores is not None else None
        self._blocks[key] = Block(blocks[full], tail_scores, top_k, tokens,
                                  None if logits is None else logits.detach().clone())
        keys.append(key)

    def _touch(self, keys: list[tuple]) -> None:
        """Mark a prompt's blocks used now, its last block least recent of them: eviction takes a
        prefix from its end, never leaving later blocks that no lookup can reach."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def evict_one(self, needed: bool = True) -> bool:
        """Give the pool back the least recently used block no sequence holds; False if none.
        Not `needed` (the pool has free blocks, but only in memory not yet resident): only while
        the cache holds more than its floor."""
        if not needed and len(self._blocks) <= self.floor:
            return False
        for key, block in self._blocks.items():
            if self.cache.refs[block.block] == 1:
                del self._blocks[key]
                self.cache.drop(block.block)
                return True
        return False

    def evictable(self) -> int:
        """Blocks `evict_one` could give back now."""
        return sum(1 for b in self._blocks.values() if self.cache.refs[b.block] == 1)

    def __len__(self) -> int:
        return len(self._blocks)
