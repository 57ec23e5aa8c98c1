"""Pieces every family's forward shares: the attention mask over a batch's cache rows and the
per-row LoRA update. Pure tensor functions; `lora_add` is TorchScript-compatible, since
llama_decode.py's scripted decode step calls it too."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import torch

if TYPE_CHECKING:
    from amber.engine.lora import LoraBatch


def attention_mask(positions: torch.Tensor, context: int) -> torch.Tensor | None:
    """(batch, 1, seq, context) bool, key j visible to query t when j <= positions[b, t]; None when
    every row is one query that sees its whole context (single-sequence decode needs no mask)."""
    if positions.shape == (1, 1):
        return None
    return (torch.arange(context, device=positions.device) <= positions.unsqueeze(-1)).unsqueeze(1)


def with_lora(lora: LoraBatch | None, layer: int, target: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = W x of projection `target`, plus each adapter row's low-rank update when there is one."""
    return y if lora is None else lora.add(layer, target, x, y)


def lora_add(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bts: List[torch.Tensor], layer: int,
             mask: Optional[torch.Tensor]) -> torch.Tensor:
    """y plus each row's adapter update (lora.LoraBatch.add); x (rows, in), y (rows, out); a this
    layer's A of the batch's adapters side by side (parts * n * r, in), bts B^T per part (layers,
    n * r, out of the part); mask (rows, n * r) keeps each row's own adapter's share, or None when
    every row has the same one.

    One matmul for A, one per part for B, however many adapters the batch mixes: each row is
    multiplied by every adapter's A and masked, cheap at LoRA ranks. B^T is kept per part, not
    block-diagonal, because its bytes are what a step pays for."""
    h = x.reshape(-1, x.shape[-1]).to(a.dtype) @ a.t()                    # (rows, parts * n * r)
    y = y.to(a.dtype)  # quantized layers answer in bf16; the update is added in the adapters' dtype
    y2 = y.view(-1, y.shape[-1])
    h = h.view(h.shape[0], len(bts), -1)
    if mask is not None:
        h.mul_(mask.unsqueeze(1))
    column = 0
    for part in range(len(bts)):
        bt = bts[part][layer]
        out = bt.shape[-1]
        y2[:, column:column + out].addmm_(h[:, part], bt)
        column += out
    return y
