"""Helpers shared by the engine tests."""
import torch


def same_cache(a, b) -> bool:
    """Two KV caches hold the same blocks, with equal keys and values in them (the pools'
    never-handed-out blocks are uninitialised memory, so whole pools cannot be compared)."""
    if a.slot_blocks != b.slot_blocks:
        return False
    used = sorted({block for blocks in a.slot_blocks for block in blocks})
    rows = torch.tensor([block * a.block_size + i for block in used for i in range(a.block_size)], dtype=torch.long)
    return torch.equal(a.keys[:, rows], b.keys[:, rows]) and torch.equal(a.values[:, rows], b.values[:, rows])
