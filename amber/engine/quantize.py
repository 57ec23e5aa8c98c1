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
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).to(torch.bfloat16)
        quantized = torch.round(w / scales.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantized)
        self.register_buffer("scales", scales)
        self.register_buffer("dense", self.dequantized())
        self.out_features, self.in_features = weight.shape

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(torch.bfloat16) * self.scales.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.shape[0] <= FUSED_INT8_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        else:
            out = F.linear(rows, self.dense)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Bf16Linear(nn.Module):
    """A linear layer kept in bf16 beside int8 ones: inputs cast in, outputs cast back."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)


def quantize_int8(model: nn.Module, bf16: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear in place: int8, or bf16 for those named in `bf16`.

    The LM head stays bf16 by default: per-channel int8 there moves logprobs by ~0.01 nats more
    (SmolLM2-135M: mean |logprob - fp32| 0.051 with it quantized, 0.041 without), which would put
    int8 over the 0.05 bar for the default precision; it costs ~1.5 ms a decode step."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Bf16Linear(child.weight) if full in bf16 else Int8Linear(child.weight))
    return model
