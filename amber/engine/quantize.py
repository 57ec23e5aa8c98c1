"""Weight-only quantization: applied to a built model from outside (gpt-fast's convert_for_runtime idea).

Each nn.Linear becomes an Int8Linear (per-output-channel symmetric int8, bf16 scales) or an
Int4Linear (groups of 32 input columns, each with its own bf16 scale and zero point).
Activations stay in the model's dtype; matmul inputs go in as bf16.

torch's fused kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) win for few rows
(single-sequence decode: 576x3072 in ~50 us against ~130 us in bf16 on an AVX-512 BF16 Xeon) and
lose to a GEMM on dequantized weights above some row count that depends on the CPU: each layer
is built with a bf16 copy of its weights, and kernels.py measures, per layer shape, up to how many
rows the fused kernel runs and which copy (bf16, fp32, or none) takes larger batches and prefill,
keeping only the copy it chose (`use`). Without that measurement (off CPU, or a caller that skips
it) the class defaults below apply.

Why int4 is not lossy for the default model: SmolLM2's GGUF stores every block linear as Q4_1,
32 weights sharing a scale and a minimum, which is exactly Int4Linear's grid. Recovering the grid
from the dequantized checkpoint (min and max of each group) gives back the same weights in fp32;
only the bf16 rounding of scales and zero points remains. On weights that were never 4-bit it is
an ordinary (lossy) 4-bit quantization: the registry's `dtype` is per model for that reason.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amber.engine import paged_ops

FUSED_MAX_ROWS = 4  # untuned default: above this many rows the dense copy is used (int8)
# the ops' overloads, looked up once: calling the packet costs a lookup per call
INT8_MM = torch.ops.aten._weight_int8pack_mm.default
INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
# the dense copies a layer may keep beside its packed weights (kernels.py chooses one, or none)
DENSE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INT4_GROUP = 32     # Q4_0/Q4_1's block size; the CPU kernel also takes 64, 128, 256


class QuantizedLinear(nn.Module):
    """A linear layer with packed low-bit weights for few rows and their bf16 dequantization for
    many. Subclasses pack the weights and run the fused kernel. A subclass that `makes_dense`
    widens its packed weights for each product of many rows instead of keeping a dense copy
    (`made`: Amber's kernels, csrc/dense.h)."""
    fused_max_rows = FUSED_MAX_ROWS
    makes_dense = False
    made: str | None = None  # the dtype ("bf16", "fp32") a layer that makes its dense weights makes them in

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # kept in the model's dtype and added after the product (GPT-J's fc_in, fc_out, lm_head)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def fused(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (n, in) bf16 -> (n, out) bf16, with the packed weights."""
        raise NotImplementedError

    def has_fused_kernel(self) -> bool:
        """Whether `fused` runs a low-bit kernel here (else it multiplies the bf16 copy)."""
        return True

    def dense_weights(self) -> torch.Tensor:
        """(out, in) bf16: the values the fused kernel multiplies by, rounded to bf16."""
        raise NotImplementedError

    def use(self, choice) -> None:
        """Apply a kernels.Choice: the fused kernel up to `fused_max_rows` rows, the dense copy
        in the chosen dtype above (kept, or made per product), and no copy at all when none is chosen."""
        self.fused_max_rows = choice.fused_max_rows
        self.made = choice.dense if getattr(choice, "made", False) else None
        if choice.dense is None or self.made:
            self.dense = None
        else:
            dense = self.dense if self.dense is not None else self.dense_weights()
            self.dense = dense.to(DENSE_DTYPES[choice.dense])

    def dense_made(self, x: torch.Tensor, dtype: str) -> torch.Tensor:
        """x times the dense weights widened for this product only, in `dtype` ("bf16", "fp32"),
        as dense_product gives it with a kept copy of that dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, in) in any float dtype -> (rows, out) in bf16 (or fp32 from an fp32 copy fed
        fp32), which is what the next matmul, RoPE and attention take; the residual stream adds it
        in its own dtype (type promotion), so no step spends a cast on the way back. Few rows are
        a decode step's hot path: kept lean."""
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        if x.shape[0] > self.fused_max_rows:
            y = self.dense_made(x, self.made) if self.made else dense_product(x, self.dense)
        else:
            y = self.fused(self.kernel_input(x))
        return y if self.bias is None else y + self.bias

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as `fused` takes it: bf16 (torch's kernels, and the int4 kernel, which rounds as they do)."""
        return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)


def dense_product(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """x @ dense^T in the copy's dtype; the product of bf16 activations stays bf16 (the bf16
    residual stream of int8-bf16 must not be promoted by an fp32 copy)."""
    y = F.linear(x.to(dense.dtype), dense)
    if x.dtype == torch.bfloat16 and y.dtype != torch.bfloat16:
        y = y.to(torch.bfloat16)
    return y


class Int8Linear(QuantizedLinear):
    """int8 weights with one bf16 scale per output channel and input group of `in / groups`
    columns (groups > 1: finer scales, less error, one more kernel call per group)."""

    def __init__(self, weight: torch.Tensor, groups: int = 1, bias: torch.Tensor | None = None):
        super().__init__(weight, bias)
        assert self.in_features % groups == 0, "groups must divide the input width"
        w = weight.detach().float().view(self.out_features, groups, -1).transpose(0, 1)  # (groups, out, in/groups)
        scales = (w.abs().amax(dim=2).clamp(min=1e-8) / 127.0).to(torch.bfloat16)          # (groups, out)
        quantized = torch.round(w / scales.float().unsqueeze(2)).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantized.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("dense", self.dequantized())

    def dense_weights(self) -> torch.Tensor:
        return self.dequantized()

    def dequantized(self) -> torch.Tensor:
        """(out, in) bf16: exactly the values the int8 kernel multiplies by."""
        w = self.weight.to(torch.bfloat16) * self.scales.unsqueeze(2)
        return w.transpose(0, 1).reshape(self.out_features, self.in_features).contiguous()

    def fused(self, rows: torch.Tensor) -> torch.Tensor:
        width = self.weight.shape[2]
        if self.weight.shape[0] == 1:
            return INT8_MM(rows, self.weight[0], self.scales[0])
        return sum(INT8_MM(rows[:, g * width:(g + 1) * width].contiguous(), self.weight[g], self.scales[g])
                   for g in range(self.weight.shape[0]))


class Int4Linear(QuantizedLinear):
    """4-bit weights q in [0, 15], in groups of `group` input columns: w = (q - 8) * scale + zero,
    scale and zero in bf16 per (group, output channel), as torch's CPU int4 kernel defines them.
    Each group's grid runs from its minimum to its maximum (Q4_1's rule)."""

    # A decode step of 8 rows through the whole model (SmolLM2-135M): 28 ms with the int4 kernel,
    # 36 ms with the bf16 copy, whose twice larger weights a step reads from memory; 12 rows: 40
    # against 38. (int8's kernel loses from 8 rows: 40 ms against 37.)
    fused_max_rows = 8

    def __init__(self, weight: torch.Tensor, group: int = INT4_GROUP, bias: torch.Tensor | None = None):
        super().__init__(weight, bias)
        assert fits_int4(weight, group), "int4 needs in % group == 0 and out % 16 == 0"
        self.group = group
        w = weight.detach().float().view(self.out_features, -1, group)     # (out, groups, group)
        low, high = w.amin(dim=2), w.amax(dim=2)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((w - low.unsqueeze(2)) / scale.unsqueeze(2)).clamp(0, 15)
        # the kernel's zero is the value at q = 8
        scales_zeros = torch.stack([scale.T, (low + 8 * scale).T], dim=-1).to(torch.bfloat16)
        q = q.view(self.out_features, self.in_features)
        scale, zero = scales_zeros.float().unbind(-1)                       # (groups, out)
        scale, zero = scale.T.unsqueeze(2), zero.T.unsqueeze(2)               # (out, groups, 1)
        # Amber's own kernel where its library is built (paged_ops: csrc/int4_mm.cpp), else
        # torch's, each with its own packing; elsewhere (CUDA) the layer runs its bf16 copy
        self.kernel = ("amber" if _own_kernels() else "torch") if weight.is_cpu else None
        if self.kernel == "amber":
            packed, scales_zeros = paged_ops.int4_pack(q.to(torch.uint8), scales_zeros)
            # no copy: many rows multiply weights widened per product (in bf16 until kernels.py
            # measures otherwise), which are what the kernel multiplies by: q s + (zero - 8 s)
            dense, self.made = None, "bf16"
        else:
            packed = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
                      if self.kernel == "torch" else None)
            scales_zeros = scales_zeros.contiguous()                        # (groups, out, 2)
            # what torch's kernel multiplies by (in fp32)
            dense = (q.view(self.out_features, -1, group) - 8) * scale + zero
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.register_buffer("dense", None if dense is None else
                             dense.view(self.out_features, self.in_features).to(torch.bfloat16))

    @property
    def makes_dense(self) -> bool:
        return self.kernel == "amber"

    def dense_made(self, x: torch.Tensor, dtype: str) -> torch.Tensor:
        return torch.ops.amber.int4_mm_dense(x, self.packed, self.scales_zeros, self.group, dtype == "fp32")

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """Amber's kernel rounds an fp32 input to bf16 itself (one op less a projection)."""
        return x if self.kernel == "amber" else super().kernel_input(x)

    def fused(self, rows: torch.Tensor) -> torch.Tensor:
        if self.kernel == "amber":
            return torch.ops.amber.int4_mm(rows, self.packed, self.scales_zeros, self.group)
        if self.kernel == "torch":
            return INT4_MM(rows, self.packed, self.group, self.scales_zeros)
        return F.linear(rows, self.dense)

    def has_fused_kernel(self) -> bool:
        return self.kernel is not None

    def dense_weights(self) -> torch.Tensor:
        """The kernel computes each weight in fp32 and rounds products to bf16: multiplying the
        identity gives W^T, every value exactly as the bf16 copy holds it."""
        if self.dense is not None:
            return self.dense
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.scales_zeros.device)
        if self.kernel == "amber":  # the widened weights themselves: the identity's product is W^T exactly
            return self.dense_made(eye, "bf16").t().contiguous()
        return self.fused(eye).t().contiguous()


def _own_kernels() -> bool:
    """Whether Amber's compiled CPU ops are loaded (paged_ops.ensure loads them once)."""
    return paged_ops.ensure()


class Int8BlockLinear(QuantizedLinear):
    """int8 weights with one fp32 scale per `block` input columns of a row (GGUF's Q8_0 grid) on
    Amber's kernel (paged_ops: csrc/int8_mm.cpp), in int8_pack's layout, which an Int8Embedding
    shares: a tied LM head multiplies by exactly the checkpoint's values, from the very bytes the
    embedding looks its rows up in (SmolLM2-135M: 30 MB for both, where a per-row int8 head held
    28 MB of its own and moved logprobs). It takes its input fp32 or bf16, multiplies it rounded
    to bf16 (the kernel's dot-product instructions take bf16), and gives fp32, which logits keep."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        tiles, width, _ = q.shape
        super().__init__(torch.empty(tiles * 16, width, device="meta"), bias)
        self.block = width // scales.shape[1]
        self.register_buffer("weight", q)        # (out / 16, in, 16) int8
        self.register_buffer("scales", scales)   # (out / 16, in / block, 16) fp32
        self.register_buffer("dense", self.dense_weights())

    def fused(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.amber.int8_mm(rows, self.weight, self.scales, self.block)

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def dense_weights(self) -> torch.Tensor:
        """(out, in) bf16: the weights q scale, rounded to bf16."""
        return paged_ops.int8_weights(self.weight, self.scales, self.block).to(torch.bfloat16)


class Int8Embedding(nn.Module):
    """An embedding table as int8 with one fp32 scale per `block` columns of a row: GGUF's Q8_0
    layout, in which GGUF files keep their token embeddings, tiled as the int8 kernel reads it
    (paged_ops.int8_pack), so that a tied head (Int8BlockLinear) shares it. Built only where that
    is lossless (`compact_embedding`): each looked-up row is then bit for bit the table's row, at a
    quarter of its memory (SmolLM2-135M: 113 MB in fp32, 30 MB here). `weight` is the int8 table,
    so the device is found where an nn.Embedding's is; `dtype` is the rows' dtype."""

    def __init__(self, table: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.block, self.dtype = table.shape[1] // scales.shape[1], dtype
        self.register_buffer("weight", table)    # (vocab / 16, dim, 16) int8
        self.register_buffer("scales", scales)   # (vocab / 16, dim / block, 16) fp32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows, scales = paged_ops.int8_rows(self.weight, self.scales, ids)
        rows = rows.view(*ids.shape, -1, self.block).float() * scales.unsqueeze(-1)
        return rows.view(*ids.shape, -1).to(self.dtype)


def compact_embedding(embedding: nn.Embedding, block: int = 32) -> nn.Module:
    """The embedding as an Int8Embedding when its table lies exactly on a Q8_0 grid (each block of
    `block` values is an int8 times the block's largest magnitude / 127), else unchanged. The test
    is the round trip itself, so a table that was never 8-bit (or lost its grid to a bf16 cast)
    keeps its own memory and values. The tiles need a vocabulary that is a multiple of 16."""
    weight = embedding.weight.detach()
    if weight.shape[1] % block or weight.shape[0] % 16 or not weight.is_floating_point():
        return embedding
    blocks = weight.float().view(weight.shape[0], -1, block)
    scales = blocks.abs().amax(dim=2) / 127                                    # (vocab, blocks)
    q = torch.round(blocks / torch.where(scales > 0, scales, 1).unsqueeze(2))
    if q.abs().max() > 127:
        return embedding
    q = q.to(torch.int8)
    if not torch.equal((q.float() * scales.unsqueeze(2)).to(weight.dtype), blocks.to(weight.dtype)):
        return embedding
    return Int8Embedding(*paged_ops.int8_pack(q.view(weight.shape), scales), weight.dtype)


def fits_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> bool:
    """The CPU int4 kernel's shape rules."""
    out_features, in_features = weight.shape
    return in_features % group == 0 and out_features % 16 == 0


def quantize(model: nn.Module, bits: int, head_groups: int = 4, keep: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear in place by an Int8Linear (bits=8) or an Int4Linear (bits=4).

    The LM head stays int8 in both: it is the tied embedding, which GGUF files keep at 8 bits
    (Q8_0), and int4 there moves logprobs far more (SmolLM2-135M: 0.17 nats). Where the table lies
    exactly on the Q8_0 grid and Amber's kernels are built, head and embedding share it (an
    Int8BlockLinear beside an Int8Embedding): the head multiplies by the checkpoint's own values.
    Otherwise the head is an Int8Linear with `head_groups` scale groups: with one scale per row int8 there moves logprobs most
    (SmolLM2-135M with int8 layers, mean |logprob - fp32|: 0.051 with 1 group, 0.048 with 4,
    0.041 left in bf16; with int4 layers 0.032 with 1 group, 0.030 with 4), and each group is one
    more kernel call over the 49,152 x 576 matrix (4 groups cost ~0.4 ms more a decode step than
    1). An int4 layer whose shape the kernel cannot take falls back to int8. Biases are kept as
    they are; layers whose names end with one of `keep` stay unquantized (the family says which).
    The token embeddings, no longer tied to the head, become an Int8Embedding where that is exact."""
    decoder = getattr(model, "model", None)
    embedding = getattr(decoder, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    tied = isinstance(head, nn.Linear) and isinstance(embedding, nn.Embedding) and head.weight is embedding.weight
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or full.endswith(keep):
                continue
            if full == "lm_head":
                compact = (compact_embedding(embedding) if tied and child.weight.is_cpu and child.bias is None
                           and _own_kernels() else None)
                if isinstance(compact, Int8Embedding):  # one Q8_0 table for the lookup and the head
                    decoder.embed_tokens = compact
                    setattr(module, child_name, Int8BlockLinear(compact.weight, compact.scales))
                else:
                    setattr(module, child_name, Int8Linear(child.weight, head_groups, child.bias))
            elif bits == 4 and fits_int4(child.weight):
                setattr(module, child_name, Int4Linear(child.weight, bias=child.bias))
            else:
                setattr(module, child_name, Int8Linear(child.weight, bias=child.bias))
    head, embedding = getattr(model, "lm_head", None), getattr(decoder, "embed_tokens", None)
    if isinstance(embedding, nn.Embedding) and not (isinstance(head, nn.Linear) and head.weight is embedding.weight):
        decoder.embed_tokens = compact_embedding(embedding)  # (not while a head left as it was is tied to it)
    return model
