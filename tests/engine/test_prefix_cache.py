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
    filled, _, _ = prefixes.load(first, 2, need_scores=False, top_k=0)
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


def test_a_prompts_last_partial_block_is_kept_and_shared_until_written():
    """The tail: a repeated 31-position prompt takes 30 positions from the cache (all but its last
    token), a prompt that parts ways inside the tail takes the positions before it parts, and the
    kept block is copied before a hit writes into it, never changed."""
    cache, prefixes = pool()
    first = [1] + list(range(100, 130))                 # 31 positions: 1 full block, a tail of 14 (+ the last)
    prefill(cache, 0, first)
    prefixes.store(first, 0, None, 0)
    kept = cache.blocks_of(0)[1]
    cache.free(0)
    assert len(prefixes) == 2 and cache.refs[kept] == 1
    filled, _, _ = prefixes.load(first, 1, need_scores=False, top_k=0)
    assert filled == 30 and cache.blocks_of(1)[1] == kept
    cache.prepare(1, filled, len(first))                # the hit computes its last token: a copy first
    assert cache.blocks_of(1)[1] != kept and cache.refs[kept] == 1
    cache.free(1)
    parted = first[:20] + [999] * 15                    # agrees with the tail on 4 of its positions
    filled, _, _ = prefixes.load(parted, 2, need_scores=False, top_k=0)
    assert filled == 20
    cache.free(2)
    assert prefixes.load([5, 6, 7], 3, need_scores=False, top_k=0)[0] == 0   # another prompt: nothing
    cache.free(3)


def test_the_same_prompt_again_fills_every_position_and_gets_the_logits_it_got_then():
    cache, prefixes = pool()
    ids = [1] + list(range(100, 130))
    prefill(cache, 0, ids)
    logits = torch.randn(50)
    kept = logits.clone()
    prefixes.store(ids, 0, None, 0, logits=logits)
    logits += 1  # the caller's tensor is the sampler's: the cache keeps its own copy
    cache.free(0)
    filled, _, got = prefixes.load(ids, 1, need_scores=False, top_k=0)
    assert filled == len(ids) and torch.equal(got, kept)
    got += 5  # ... and hands out copies
    cache.free(1)
    assert torch.equal(prefixes.load(ids, 2, need_scores=False, top_k=0)[2], kept)
    cache.free(2)
    # a longer prompt through the same tail: positions, never the logits
    filled, _, got = prefixes.load(ids + [7, 8], 3, need_scores=False, top_k=0)
    assert filled == len(ids) and got is None
    cache.free(3)


def test_a_tail_serves_scores_only_as_complete_as_asked():
    from amber.engine.types import TokenLogprob
    cache, prefixes = pool()
    ids = [1] + list(range(100, 125))                   # 26 positions: a tail of 9 scored positions
    scores = [TokenLogprob(t, -0.5, -0.5, ((t, -0.5),)) for t in ids[1:]]
    prefill(cache, 0, ids)
    prefixes.store(ids, 0, scores, 1)
    cache.free(0)
    filled, got, _ = prefixes.load(ids, 1, need_scores=True, top_k=1)
    assert filled == 25 and [t.token_id for t in got] == ids[1:26]
    cache.free(1)
    filled, _, _ = prefixes.load(ids, 2, need_scores=True, top_k=3)     # more alternatives than kept: no hit
    assert filled == 0
    cache.free(2)
