"""The compiled int8 matmul with a scale per block of columns (csrc/int8_mm.cpp, GGUF's Q8_0 grid)
against an fp64 oracle and its pure-torch reference, and the tied head built on it, which shares
its bytes with the token embeddings (quantize.Int8BlockLinear, Int8Embedding).

The op multiplies x rounded to bf16, sums in fp32 and returns fp32: it agrees with the exact
product of that x to fp32 rounding of sums of `in` terms. A row's result never depends on the
other rows or the thread count: bit for bit."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from amber.engine import paged_ops
from amber.engine.quantize import Int8BlockLinear, Int8Embedding, Int8Linear, quantize
from tests.engine.test_precision import q8_0_table

SHAPES = [(48, 64, 32), (96, 128, 32), (32, 256, 64), (16, 96, 16)]  # (out, in, block)


def weights(out: int, inn: int, block: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out, inn), generator=g, dtype=torch.int8)
    scales = torch.rand(out, inn // block, generator=g) * 0.01
    return q, scales


def test_packing_and_row_lookup():
    q, scales = weights(48, 64, 32)
    qt, st = paged_ops.int8_pack(q, scales)
    assert qt.shape == (3, 64, 16) and st.shape == (3, 2, 16)
    ids = torch.tensor([[0, 17], [47, 5]])
    rows, row_scales = paged_ops.int8_rows(qt, st, ids)
    assert torch.equal(rows, q[ids]) and torch.equal(row_scales, scales[ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_op_equals_the_exact_product_to_fp32_rounding(kernel, shape, dtype):
    out, inn, block = shape
    q, scales = weights(out, inn, block)
    qt, st = paged_ops.int8_pack(q, scales)
    w = (q.double().view(out, -1, block) * scales.double()[..., None]).view(out, inn)
    for rows in (1, 2, 3, 4, 5, 9, 70):
        x = torch.randn(rows, inn, generator=torch.Generator().manual_seed(rows)).to(dtype)
        got = torch.ops.amber.int8_mm(x, qt, st, block)
        assert got.dtype == torch.float32 and got.shape == (rows, out)
        xb = x.to(torch.bfloat16).double()  # what the op multiplies: x rounded to bf16
        want = xb @ w.T
        bound = 1e-6 * inn * (xb.abs() @ w.abs().T) + 1e-30
        assert ((got.double() - want).abs() <= bound).all()
        reference = paged_ops.int8_mm_reference(x, qt, st, block)
        assert ((reference.double() - want).abs() <= bound).all()


def test_a_batch_equals_each_row_alone_and_one_thread_bit_for_bit(kernel):
    q, scales = weights(96, 128, 32, seed=3)
    qt, st = paged_ops.int8_pack(q, scales)
    x = torch.randn(70, 128, generator=torch.Generator().manual_seed(4))
    batch = torch.ops.amber.int8_mm(x, qt, st, 32)
    for n in (1, 3, 4, 7):
        assert torch.equal(torch.ops.amber.int8_mm(x[:n], qt, st, 32), batch[:n])
    for row in range(0, 70, 9):
        assert torch.equal(torch.ops.amber.int8_mm(x[row:row + 1], qt, st, 32)[0], batch[row])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(torch.ops.amber.int8_mm(x, qt, st, 32), batch)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="q has 128 input columns, x has 64"):
        torch.ops.amber.int8_mm(x[:, :64], qt, st, 32)
    with pytest.raises(RuntimeError, match="block must be a multiple of 4"):
        torch.ops.amber.int8_mm(x, qt, st, 6)


class Tied(nn.Module):
    """The shape quantize() looks for: model.embed_tokens and an lm_head tied to it."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding.from_pretrained(table)
        self.lm_head = nn.Linear(table.shape[1], table.shape[0], bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight


def test_a_tied_head_on_the_q8_0_grid_shares_the_embeddings_int8_table_and_multiplies_exactly(kernel):
    table = q8_0_table(320, 64)
    model = quantize(Tied(table), 4)
    head, embedding = model.lm_head, model.model.embed_tokens
    assert isinstance(head, Int8BlockLinear) and isinstance(embedding, Int8Embedding)
    assert head.weight is embedding.weight and head.scales is embedding.scales
    ids = torch.tensor([3, 0, 319])
    assert torch.equal(embedding(ids), table[ids])
    x = torch.randn(3, 64, dtype=torch.float64)
    logits = head(x.float())
    assert logits.dtype == torch.float32
    xb = x.float().bfloat16().double()  # the head multiplies x rounded to bf16 (csrc/int8_mm.cpp)
    torch.testing.assert_close(logits.double(), xb @ table.double().T, rtol=1e-5, atol=1e-5)
    assert torch.equal(head.dense_weights(), table.bfloat16())
    # off the grid: the per-row int8 head of before, and an embedding of its own
    model = quantize(Tied(torch.randn(320, 64)), 4)
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.embed_tokens, nn.Embedding)


@pytest.mark.parametrize("fp32", [False, True])
def test_the_dense_product_made_per_call_equals_its_reference(kernel, fp32):
    """int8_mm_dense: the weights widened per call, in slices when they exceed the scratch (the
    head of a real vocabulary does), then a GEMM."""
    q, scales = weights(16 * 600, 576, 32, seed=9)   # 9,600 x 576: bf16 11 MB, two slices
    qt, st = paged_ops.int8_pack(q, scales)
    x = torch.randn(21, 576, generator=torch.Generator().manual_seed(10))
    got = torch.ops.amber.int8_mm_dense(x, qt, st, 32, fp32)
    want = paged_ops.int8_mm_dense_reference(x, qt, st, 32, fp32)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if fp32 else 1e-2, atol=1e-5 if fp32 else 1e-2)
