"""The compiled paged decode attention op against its pure-torch reference, on random pools with
shuffled block tables, ragged lengths, GQA and sliding windows.

The reference upcasts the gathered keys and values to fp32 before SDPA, as the kernel does, so the
two agree to float rounding whatever the pool's dtype; only a bf16 q (whose output is rounded to
bf16 by both) gets a bf16-sized tolerance.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from amber.engine import paged_ops

REPO = Path(__file__).resolve().parents[2]
BLOCK = 16
LENGTHS = [1, 15, 16, 17, 300]


def paged_inputs(heads: int, kv_heads: int, head_dim: int, pool_dtype: torch.dtype, q_dtype: torch.dtype,
                 seed: int = 0):
    """Pools with a few blocks no row uses, each row's blocks scattered over the pool in random
    order, and table entries past a row's length set to -1 (never to be read)."""
    torch.manual_seed(seed)
    needed = [math.ceil(n / BLOCK) for n in LENGTHS]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks).to(torch.int32)
    tables = torch.full((len(LENGTHS), max(needed)), -1, dtype=torch.int32)
    taken = 0
    for row, n in enumerate(needed):
        tables[row, :n] = order[taken:taken + n]
        taken += n
    keys = torch.randn(num_blocks * BLOCK, kv_heads, head_dim).to(pool_dtype)
    values = torch.randn(num_blocks * BLOCK, kv_heads, head_dim).to(pool_dtype)
    q = torch.randn(len(LENGTHS), heads, head_dim).to(q_dtype)
    return q, keys, values, tables, torch.tensor(LENGTHS, dtype=torch.int32)


@pytest.mark.parametrize("window", [0, 8])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 1, 16)])
def test_kernel_matches_reference(kernel, heads, kv_heads, head_dim, pool_dtype, q_dtype, window):
    q, keys, values, tables, lengths = paged_inputs(heads, kv_heads, head_dim, pool_dtype, q_dtype)
    args = (tables, lengths, BLOCK, 1 / math.sqrt(head_dim), window)
    out = torch.ops.amber.paged_decode_attention(q, keys, values, *args)
    expected = paged_ops.paged_decode_attention_reference(q, keys, values, *args)
    assert out.dtype == q_dtype and out.shape == q.shape
    tol = 1e-5 if q_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def test_window_hides_old_positions(kernel):
    """Changing a key the window hides changes nothing; one it shows changes the output."""
    q, keys, values, tables, lengths = paged_inputs(4, 1, 16, torch.float32, torch.float32)
    row, length = 4, LENGTHS[4]
    slot = lambda position: int(tables[row, position // BLOCK]) * BLOCK + position % BLOCK  # noqa: E731
    args = (tables, lengths, BLOCK, 0.25, 8)
    before = torch.ops.amber.paged_decode_attention(q, keys, values, *args)
    values[slot(length - 9)] += 100
    assert torch.equal(torch.ops.amber.paged_decode_attention(q, keys, values, *args), before)
    values[slot(length - 8)] += 100
    assert not torch.allclose(torch.ops.amber.paged_decode_attention(q, keys, values, *args)[row], before[row])


def test_empty_row_gives_zeros(kernel):
    q, keys, values, tables, lengths = paged_inputs(4, 1, 16, torch.float32, torch.float32)
    lengths[0] = 0
    args = (q, keys, values, tables, lengths, BLOCK, 0.25, 0)
    assert torch.equal(torch.ops.amber.paged_decode_attention(*args)[0], torch.zeros(4, 16))
    assert torch.equal(paged_ops.paged_decode_attention_reference(*args)[0], torch.zeros(4, 16))


def test_same_result_on_one_thread(kernel):
    q, keys, values, tables, lengths = paged_inputs(9, 3, 64, torch.bfloat16, torch.float32)
    args = (q, keys, values, tables, lengths, BLOCK, 0.125, 0)
    threads = torch.get_num_threads()
    many = torch.ops.amber.paged_decode_attention(*args)
    torch.set_num_threads(1)
    try:
        assert torch.equal(torch.ops.amber.paged_decode_attention(*args), many)
    finally:
        torch.set_num_threads(threads)


def test_callable_from_torchscript(kernel):
    @torch.jit.script
    def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
               lengths: torch.Tensor, block_size: int, scale: float, window: int) -> torch.Tensor:
        return torch.ops.amber.paged_decode_attention(q, keys, values, tables, lengths, block_size, scale, window)

    q, keys, values, tables, lengths = paged_inputs(9, 3, 64, torch.bfloat16, torch.bfloat16)
    args = (q, keys, values, tables, lengths, BLOCK, 0.125, 8)
    assert torch.equal(attend(*args), torch.ops.amber.paged_decode_attention(*args))


def test_bad_table_entry_is_an_error(kernel):
    q, keys, values, tables, lengths = paged_inputs(4, 1, 16, torch.float32, torch.float32)
    tables[2, 0] = -1
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.amber.paged_decode_attention(q, keys, values, tables, lengths, BLOCK, 0.25, 0)


def test_load_without_library_is_false(tmp_path, monkeypatch):
    monkeypatch.setitem(paged_ops._state, "compiled", False)  # as in a process that never loaded it
    monkeypatch.setattr(paged_ops, "_registered", lambda: False)
    assert paged_ops.load(tmp_path) is False


def test_fallback_dispatch(kernel, monkeypatch):
    """paged_decode_attention picks the op when loaded and the reference when not; both agree."""
    q, keys, values, tables, lengths = paged_inputs(9, 3, 64, torch.bfloat16, torch.float32)
    args = (q, keys, values, tables, lengths, BLOCK, 0.125, 0)
    fast = paged_ops.paged_decode_attention(*args)
    monkeypatch.setattr(paged_ops, "available", lambda: False)
    torch.testing.assert_close(paged_ops.paged_decode_attention(*args), fast, atol=1e-5, rtol=1e-5)
