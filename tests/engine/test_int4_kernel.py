"""The compiled 4-bit matmul (csrc/int4_mm.cpp) against an fp64 oracle and its pure-torch reference,
and the layer built on it (quantize.Int4Linear) against its own bf16 copy.

The op sums in fp32 and rounds the product to bf16 once, so it agrees with the exact product to
half a bf16 step plus fp32 rounding. A row's result never depends on the other rows or the thread
count: bit for bit."""
from __future__ import annotations


import pytest
import torch

from amber.engine import paged_ops
from amber.engine.quantize import Int4Linear

# (out, in, group); groups of 12 and 4 columns leave two pairs over the four the BF16 path reads at once
SHAPES = [(48, 64, 32), (96, 128, 32), (32, 256, 64), (16, 128, 128), (32, 96, 12), (16, 32, 4)]
ROWS = (1, 2, 3, 4, 5, 9, 17, 70)  # every tail of the kernel's row blocks, and past its 64-row chunk


def weights(out: int, inn: int, group: int, seed: int = 0):
    """Random q, and bf16 scales and zeros as Int4Linear makes them: (groups, out, 2)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, inn), generator=g, dtype=torch.uint8)
    scale = torch.rand(inn // group, out, generator=g) * 0.02 + 1e-3
    zero = torch.randn(inn // group, out, generator=g) * 0.05
    return q, torch.stack([scale, zero], dim=-1).to(torch.bfloat16)


def exact_weights(q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """W = (q - 8) scale + zero in fp64."""
    scale, zero = sz.double().unbind(-1)
    w = (q.double().view(q.shape[0], -1, group) - 8) * scale.T[..., None] + zero.T[..., None]
    return w.view(q.shape[0], -1)


def exact(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    return x.double() @ exact_weights(q, sz, group).T


def exact_abs(q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    return exact_weights(q, sz, group).abs()


def test_packing_round_trips():
    q, sz = weights(48, 64, 32)
    packed, psz = paged_ops.int4_pack(q, sz)
    assert packed.shape == (3, 32, 16) and packed.dtype == torch.uint8 and psz.shape == (3, 2, 2, 16)
    back, scale, zero = paged_ops.int4_unpack(packed, psz)
    assert torch.equal(back, q)
    assert torch.equal(scale, sz[..., 0].float().T) and torch.equal(zero, sz[..., 1].float().T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_op_equals_the_exact_product_to_bf16_rounding(kernel, shape, dtype):
    out, inn, group = shape
    q, sz = weights(out, inn, group)
    packed, psz = paged_ops.int4_pack(q, sz)
    for rows in ROWS:
        x = torch.randn(rows, inn, generator=torch.Generator().manual_seed(rows)).to(dtype)
        got = torch.ops.amber.int4_mm(x, packed, psz, group)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
        xb = x.to(torch.bfloat16)  # what the op multiplies: an fp32 x is rounded to bf16 first
        want = exact(xb, q, sz, group)
        # half a bf16 step of the value, plus fp32 rounding of sums of ~inn terms
        bound = want.abs() * 2.0 ** -8 + 1e-5 * inn * (xb.double().abs() @ exact_abs(q, sz, group).T)
        assert ((got.double() - want).abs() <= bound).all()
        reference = paged_ops.int4_mm_reference(x, packed, psz, group)
        assert ((reference.double() - want).abs() <= bound).all()
        if dtype == torch.float32:
            assert torch.equal(got, torch.ops.amber.int4_mm(xb, packed, psz, group))
        # wide: the same bf16 values, widened to fp32
        wide = torch.ops.amber.int4_mm(x, packed, psz, group, True)
        assert wide.dtype == torch.float32 and torch.equal(wide, got.float())
        assert torch.equal(paged_ops.int4_mm_reference(x, packed, psz, group, True), reference.float())


def test_a_batch_equals_each_row_alone_and_one_thread_bit_for_bit(kernel):
    out, inn, group = 96, 128, 32
    q, sz = weights(out, inn, group, seed=3)
    packed, psz = paged_ops.int4_pack(q, sz)
    x = torch.randn(70, inn, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    batch = torch.ops.amber.int4_mm(x, packed, psz, group)
    for n in (1, 3, 8, 13):
        assert torch.equal(torch.ops.amber.int4_mm(x[:n], packed, psz, group), batch[:n])
    for row in range(0, 70, 7):
        assert torch.equal(torch.ops.amber.int4_mm(x[row:row + 1], packed, psz, group)[0], batch[row])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(torch.ops.amber.int4_mm(x, packed, psz, group), batch)
    finally:
        torch.set_num_threads(threads)


def test_the_layer_multiplies_by_exactly_its_bf16_weights(kernel):
    """Int4Linear on the op: the kernel's product by the identity is the layer's bf16 weights bit
    for bit (those a kept copy holds and the made-per-product path widens), and a product agrees
    with their GEMM."""
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(5)) * 0.05
    layer = Int4Linear(w)
    assert layer.kernel == "amber" and layer.has_fused_kernel()
    eye = torch.eye(128, dtype=torch.bfloat16)
    dense = layer.dense_weights()
    assert torch.equal(layer.fused(eye).t(), dense)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    torch.testing.assert_close(layer.fused(x).float(), (x.float() @ dense.float().T), atol=2e-2, rtol=1e-2)


def test_callable_from_torchscript_and_checks_its_arguments(kernel):
    @torch.jit.script
    def mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
        return torch.ops.amber.int4_mm(x, packed, sz, group)

    q, sz = weights(48, 64, 32)
    packed, psz = paged_ops.int4_pack(q, sz)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert torch.equal(mm(x, packed, psz, 32), torch.ops.amber.int4_mm(x, packed, psz, 32))
    with pytest.raises(RuntimeError, match="packed holds 64 input columns, x has 32"):
        torch.ops.amber.int4_mm(x[:, :32], packed, psz, 32)
    with pytest.raises(RuntimeError, match="group must be a multiple of 4"):
        torch.ops.amber.int4_mm(x, packed, psz, 6)
    with pytest.raises(RuntimeError, match="sz must be"):
        torch.ops.amber.int4_mm(x, packed, psz.float(), 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_multiply_weights_made_per_product_as_a_kept_copy_would(kernel, dtype):
    """A big batch widens the packed weights per product (csrc/dense.h): in bf16 exactly the kept
    bf16 copy's GEMM, in fp32 the exact weights' GEMM; the layer holds no copy at all."""
    w = torch.randn(3072, 576, generator=torch.Generator().manual_seed(7)) * 0.05
    layer = Int4Linear(w)
    assert layer.dense is None and layer.made == "bf16" and layer.makes_dense
    copy = layer.dense_weights()
    assert torch.equal(copy, paged_ops.int4_mm_dense_reference(torch.eye(576), layer.packed, layer.scales_zeros, 32,
                                                               False).t())
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(8)).to(dtype)
    made = layer.dense_made(x, "bf16")
    assert made.dtype == torch.bfloat16 and torch.equal(made, torch.nn.functional.linear(x.bfloat16(), copy))
    assert torch.equal(layer(x), made)  # 40 rows: past the kernel's rows, the made path
    exact = paged_ops.int4_mm_dense_reference(x, layer.packed, layer.scales_zeros, 32, True)
    got = layer.dense_made(x, "fp32")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), exact.float(), rtol=1e-4 if dtype == torch.float32 else 1e-2,
                               atol=1e-4 if dtype == torch.float32 else 1e-2)
