"""Weight-only int8: applied to a built model from outside (gpt-fast's convert_for_runtime idea).

Each nn.Linear becomes an Int8Linear: per-output-channel symmetric int8 weights with bf16 scales.
Activations stay in the model's dtype; matmul inputs go in as bf16.

Measured on this 2-core AVX-512/AMX machine (bench/engine.py): torch's fused int8 kernel
(`_weight_int8pack_mm`) reads a quarter of fp32's bytes and wins for up to 4 rows (single-sequence
decode: 576x3072 in ~50 us against ~130 us in bf16), but loses to a bf16 GEMM from 8 rows up, and
is ~10x slower still with fp32 inputs. So each layer also keeps its weights dequantized to bf16 -
the same values the int8 kernel multiplies by - for batches and prefill. Both paths compute with
identical weights, so a request's tokens do not depend on what shares its batch; the price is
memory (int8 + bf16 copies, 3 bytes a weight) for speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FUSED_INT8_MAX_ROWS = 4  # above this many rows the bf16 GEMM on the dequantized copy is faster


class Int8Linear(nn.Module):
    """int8 weights with one bf16 scale per output channel and input group of `in / groups`
    columns (groups > 1: finer scales, less error, one more kernel call per group)."""

    def __init__(self, weight: torch.Tensor, groups: int = 1):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        assert self.in_features % groups == 0, "groups must divide the input width"
        w = weight.detach().float().view(self.out_features, groups, -1).transpose(0, 1)  # (groups, out, in/groups)
        scales = (w.abs().amax(dim=2).clamp(min=1e-8) / 127.0).to(torch.bfloat16)          # (groups, out)
        quantized = torch.round(w / scales.float().unsqueeze(2)).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantized.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("dense", self.dequantized())

    def dequantized(self) -> torch.Tensor:
        """(out, in) bf16: exactly the values the int8 kernel multiplies by."""
        w = self.weight.to(torch.bfloat16) * self.scales.unsqueeze(2)
        return w.transpose(0, 1).reshape(self.out_features, self.in_features).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.shape[0] <= FUSED_INT8_MAX_ROWS:
            width = self.weight.shape[2]
            out = sum(torch.ops.aten._weight_int8pack_mm(rows[:, g * width:(g + 1) * width].contiguous(),
                                                         self.weight[g], self.scales[g])
                      for g in range(self.weight.shape[0]))
        else:
            out = F.linear(rows, self.dense)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize_int8(model: nn.Module, groups: dict[str, int] | None = None) -> nn.Module:
    """Replace every nn.Linear in place by an Int8Linear; `groups` gives finer scales by name.

    The LM head gets 4 groups by default: with one scale per row, int8 there moves logprobs most
    (SmolLM2-135M, mean |logprob - fp32|: 0.051 with 1 group, 0.048 with 4, 0.041 left in bf16),
    and 4 groups cost ~0.2 ms a decode step where bf16 would cost ~3 ms."""
    groups = {"lm_head": 4} if groups is None else groups
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child.weight, groups.get(full, 1)))
    return model
