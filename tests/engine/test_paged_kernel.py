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
                 seed: int = 0, lengths: list[int] = LENGTHS):
    """Pools with a few blocks no row uses, each row's blocks scattered over the pool in random
    order, and table entries past a row's length set to -1 (never to be read)."""
    torch.manual_seed(seed)
    needed = [math.ceil(n / BLOCK) for n in lengths]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks).to(torch.int32)
    tables = torch.full((len(lengths), max(needed)), -1, dtype=torch.int32)
    taken = 0
    for row, n in enumerate(needed):
        tables[row, :n] = order[taken:taken + n]
        taken += n
    keys = torch.randn(num_blocks * BLOCK, kv_heads, head_dim).to(pool_dtype)
    values = torch.randn(num_blocks * BLOCK, kv_heads, head_dim).to(pool_dtype)
    q = torch.randn(len(lengths), heads, head_dim).to(q_dtype)
    return q, keys, values, tables, torch.tensor(lengths, dtype=torch.int32)


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


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 128)])
def test_a_bf16_q_on_a_bf16_pool_is_the_exact_attention_rounded_to_bf16(kernel, heads, kv_heads, head_dim):
    """Where the CPU has AVX-512 BF16 this case scores q . k by vdpbf16ps and scales after (1/sqrt(128)
    is no power of two): the outputs against attention computed here in float64 from the same bf16
    values, then rounded to bf16. fp32 sums may flip a rounding near a tie, nothing more: every
    output within one bf16 step of the exact value and at least 99% of them its rounding (1e-2 of
    the test above would let a 1% error in the scores through)."""
    lengths = [1, 15, 17, 300, 513]
    q, keys, values, tables, lens = paged_inputs(heads, kv_heads, head_dim, torch.bfloat16, torch.bfloat16, 5, lengths)
    scale = 1 / math.sqrt(head_dim)
    got = torch.ops.amber.paged_decode_attention(q, keys, values, tables, lens, BLOCK, scale, 0)
    exact = torch.empty(len(lengths), heads, head_dim, dtype=torch.float64)
    for row, n in enumerate(lengths):
        slots = [int(tables[row, p // BLOCK]) * BLOCK + p % BLOCK for p in range(n)]
        k = keys[slots].double().repeat_interleave(heads // kv_heads, 1)  # (n, heads, head_dim)
        v = values[slots].double().repeat_interleave(heads // kv_heads, 1)
        weights = (torch.einsum("hd,nhd->hn", q[row].double(), k) * scale).softmax(-1)
        exact[row] = torch.einsum("hn,nhd->hd", weights, v)
    assert ((got.double() - exact).abs() <= exact.abs() * 2.0 ** -7 + 1e-30).all()
    assert (got == exact.to(torch.bfloat16)).double().mean() >= 0.99


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


def rope_inputs(heads: int, kv_heads: int, head_dim: int, pool_dtype: torch.dtype, seed: int = 0):
    """paged_inputs plus what a decode step brings: the qkv projection (fp32), each row's cos and
    sign-folded sin at its position (real RoPE tables), and the slot its new token goes to (the
    last position of its length, so the row attends to what it writes)."""
    _, keys, values, tables, lengths = paged_inputs(heads, kv_heads, head_dim, pool_dtype, torch.float32, seed)
    qkv = 3 * torch.randn(len(LENGTHS), (heads + 2 * kv_heads) * head_dim)
    positions = lengths.long() - 1
    angles = positions.float()[:, None] * (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1)
    write = tables.long().gather(1, (positions // BLOCK)[:, None])[:, 0] * BLOCK + positions % BLOCK
    return qkv, cos, sin, keys, values, write, tables, lengths


@pytest.mark.parametrize("window", [0, 8])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 1, 16), (8, 8, 128), (6, 2, 48)])
def test_rope_attention_is_its_torch_ops_bit_for_bit(kernel, heads, kv_heads, head_dim, pool_dtype, window):
    """The fused decode op (RoPE, KV write, attention) gives exactly what the torch ops it replaces
    give, output and both pools, so a decode step through it still equals forward() bit for bit."""
    qkv, cos, sin, keys, values, write, tables, lengths = rope_inputs(heads, kv_heads, head_dim, pool_dtype)
    ref_keys, ref_values = keys.clone(), values.clone()
    args = (tables, lengths, BLOCK, heads, head_dim ** -0.5, window)
    out = torch.ops.amber.paged_rope_attention(qkv, cos, sin, keys, values, write, *args)
    expected = paged_ops.paged_rope_attention_reference(qkv, cos, sin, ref_keys, ref_values, write, *args)
    assert out.dtype == pool_dtype and out.shape == (len(LENGTHS), heads * head_dim)
    assert torch.equal(out, expected)
    assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
    assert not torch.equal(keys, paged_inputs(heads, kv_heads, head_dim, pool_dtype, torch.float32)[1])  # it wrote


def test_rope_attention_rotates_as_transformers_does(kernel):
    """An independent check of the RoPE part: the key the op stores is Hugging Face's
    apply_rotary_pos_emb of the projected key (rotate_half and unfolded sin, written out here from
    the angles), at fp32 rounding; the value is stored as projected."""
    heads, kv_heads, head_dim = 4, 2, 32
    qkv, cos, sin, keys, values, write, tables, lengths = rope_inputs(heads, kv_heads, head_dim, torch.float32)
    torch.ops.amber.paged_rope_attention(qkv, cos, sin, keys, values, write, tables, lengths, BLOCK, heads, 0.2, 0)
    rows = qkv.view(len(LENGTHS), -1, head_dim)
    k, half = rows[:, heads:heads + kv_heads], head_dim // 2
    angles = (lengths.float() - 1)[:, None] * (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    hf_cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None]
    hf_sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None]
    rotate_half = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    torch.testing.assert_close(keys[write], k * hf_cos + rotate_half * hf_sin, atol=1e-5, rtol=1e-5)
    assert torch.equal(values[write], rows[:, heads + kv_heads:])


def test_rope_attention_same_result_on_one_thread(kernel):
    qkv, cos, sin, keys, values, write, tables, lengths = rope_inputs(9, 3, 64, torch.bfloat16)
    run = lambda: torch.ops.amber.paged_rope_attention(qkv, cos, sin, keys.clone(), values.clone(), write,  # noqa: E731
                                                       tables, lengths, BLOCK, 9, 0.125, 0)
    many, threads = run(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(run(), many)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(write=a["write"].clone().fill_(10 ** 6)), "write row"),
    (lambda a: a.update(write=a["write"].int()), "write_rows must be"),
    (lambda a: a.update(qkv=a["qkv"][:, :-1]), "qkv must hold"),
    (lambda a: a.update(qkv=a["qkv"].bfloat16()), "must be float32"),
    (lambda a: a.update(cos=a["cos"][:-1]), "cos and sin"),
])
def test_rope_attention_bad_input_is_an_error(kernel, change, message):
    names = ("qkv", "cos", "sin", "keys", "values", "write", "tables", "lengths")
    args = dict(zip(names, rope_inputs(4, 1, 16, torch.float32)))
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.amber.paged_rope_attention(*args.values(), BLOCK, 4, 0.25, 0)
