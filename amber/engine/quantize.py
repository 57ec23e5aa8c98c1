"""Weight-only int8: applied to a built model from outside (gpt-fast's convert_for_runtime idea).

Each nn.Linear becomes an Int8Linear holding per-output-channel symmetric int8 weights and scales in
the activations' dtype (the model's: fp32 or bf16). Small batches (decode) use torch's fused int8 matmul, which reads a
quarter of fp32's bytes; larger ones (prefill) dequantize the layer's weight once and run a bf16 GEMM,
where compute, not memory, is the limit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FUSED_INT8_MAX_ROWS = 16  # above this many rows a dequantized bf16 GEMM is faster


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(weight.dtype))
        self.out_features, self.in_features = weight.shape

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= FUSED_INT8_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        else:
            out = F.linear(rows, self.dequantized())
        return out.view(*x.shape[:-1], self.out_features)


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear in place except those named in `skip`; embeddings stay."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                setattr(module, child_name, Int8Linear(child.weight))
    return model
