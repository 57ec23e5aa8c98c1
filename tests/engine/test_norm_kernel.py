"""The compiled RMSNorm ops (csrc/rms_norm.cpp) against Hugging Face's LlamaRMSNorm and against
each other: the fused residual add + norm of a decode step must equal the add and the norm that
forward() runs, bit for bit."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from amber.engine import paged_ops


def hf_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = LlamaRMSNorm(weight.shape[0], eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


@pytest.mark.parametrize("shape", [(1, 576), (7, 576), (3, 5, 64), (2, 33), (40, 960)])
def test_rms_norm_matches_transformers(kernel, shape):
    torch.manual_seed(0)
    x, weight = 5 * torch.randn(shape), torch.randn(shape[-1])
    out = torch.ops.amber.rms_norm(x, weight, 1e-5)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, hf_norm(x, weight, 1e-5), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(out, paged_ops.rms_norm_reference(x, weight, 1e-5), atol=2e-6, rtol=2e-6)


def test_add_rms_norm_is_the_add_then_the_norm_bit_for_bit(kernel):
    torch.manual_seed(1)
    x, delta, weight = torch.randn(9, 576), torch.randn(9, 576), torch.randn(576)
    total, normed = torch.ops.amber.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)
    assert torch.equal(normed, torch.ops.amber.rms_norm(x + delta, weight, 1e-6))


def test_a_row_does_not_depend_on_the_batch_or_the_threads(kernel):
    torch.manual_seed(2)
    x, weight = torch.randn(64, 576), torch.randn(576)
    many = torch.ops.amber.rms_norm(x, weight, 1e-5)
    assert torch.equal(torch.ops.amber.rms_norm(x[13:14], weight, 1e-5), many[13:14])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(torch.ops.amber.rms_norm(x, weight, 1e-5), many)
    finally:
        torch.set_num_threads(threads)


def test_non_contiguous_rows_are_normalised_as_their_copy(kernel):
    x, weight = torch.randn(8, 128), torch.randn(64)
    view = x[:, ::2]
    assert torch.equal(torch.ops.amber.rms_norm(view, weight, 1e-5), torch.ops.amber.rms_norm(view.contiguous(), weight, 1e-5))


@pytest.mark.parametrize("args,message", [
    ((torch.randn(2, 8).bfloat16(), torch.randn(8), 1e-5), "float32"),
    ((torch.randn(2, 8), torch.randn(7), 1e-5), "weight must be"),
])
def test_bad_input_is_an_error(kernel, args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.amber.rms_norm(*args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.amber.add_rms_norm(args[0], args[0], *args[1:])
