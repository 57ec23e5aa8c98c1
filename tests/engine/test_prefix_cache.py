"""The prefix cache's memory: past its floor it lives in pool memory that is already resident, and
it gives a prompt's blocks back from the prompt's end."""
from __future__ import annotations

import pytest
import torch

from amber.engine.kv_cache import KVCache, PoolExhausted
from amber.engine.prefix_cache import PrefixCache

BS = 16


def pool(blocks: int = 40) -> tuple[KVCache, PrefixCache]:
    cache = KVCache(1, 4, 1, 16 * BS, 2, torch.float32, blocks=blocks)
    return cache, PrefixCache(cache, max_blocks=32, floor=4)


def prefill(cache: KVCache, slot: int, ids: list[int]) -> None:
    cache.prepare(slot, 0, len(ids))
    for b in cache.blocks_of(slot):  # a block's keys say which prompt wrote it
        cache.keys[:, b * BS:(b + 1) * BS] = ids[0]


def test_past_its_floor_the_cache_reuses_its_own_blocks_before_the_pool_backs_new_ones():
    cache, prefixes = pool()
    first = [1] + list(range(100, 196))          # 97 positions: 7 blocks, 6 of them full with a token after
    prefill(cache, 0, first)
    prefixes.store(first, 0, None, 0)
    cache.free(0)
    assert len(prefixes) == 6 and cache.backed == 7
    second = [2] + list(range(300, 396))
    prefill(cache, 1, second)
    # one block was free in memory already; then the cache gave back two of its six (down to its
    # floor of 4), and only then did the pool back new blocks
    assert len(prefixes) == 4 and cache.backed == 7 + 7 - 1 - 2
    # it gave them back from the prompt's end: the first four blocks still serve the first prompt
    filled, _ = prefixes.load(first, 2, need_scores=False, top_k=0)
    assert filled == 4 * BS
    assert all(cache.keys[0, b * BS, 0, 0] == 1 for b in cache.blocks_of(2))


def test_a_full_pool_still_takes_every_block_the_cache_alone_holds():
    cache, prefixes = pool(blocks=12)
    first = [1] + list(range(100, 196))
    prefill(cache, 0, first)
    prefixes.store(first, 0, None, 0)
    cache.free(0)
    prefill(cache, 1, [2] + list(range(300, 460)))   # 161 positions: 11 blocks of the 12
    assert len(prefixes) == 1 and cache.free_blocks() == 0
    with pytest.raises(PoolExhausted):
        prefill(cache, 2, [3] + list(range(500, 540)))
