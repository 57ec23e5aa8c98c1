"""Llama's fast decode path: one new token per sequence through every layer, as one TorchScript function:
`decode_rows` for a batch, with or without adapters, `decode_layers` for a single sequence.

These steps are where per-op cost, not arithmetic, sets the speed: a step is ~1,000 small ops
around 121 matmuls, and in eager mode each op costs ~2-3 us of Python and dispatch. Run by
TorchScript's interpreter, the layers of SmolLM2-135M int4 take ~7 ms instead of 9.0 ms for one
sequence, and a whole single-stream step ~11 ms instead of 12.7 (measured; torch.compile was
slower here: 16 ms a step compiled layer by layer, after 30-90 s of compiling on 2 cores). Each
computes exactly what `llama.LlamaForCausalLM.forward` computes for those tokens, op for op
(tests/engine/test_precision.py and test_lora.py check they agree bit for bit, in every precision
mode, with and without adapters), sharing its RMSNorm (`rms_norm`) and LoRA update (`layers.lora_add`).
TorchScript releases the GIL while it runs, as eager ops do, so the HTTP thread is not held up.

Where Amber's compiled CPU ops are loaded (paged_ops.py), fp32 steps go further: a layer's RoPE, KV
write and attention are one op (`_attention`: paged_rope_attention), and each residual add is one
op with the norm after it (`add_rms_norm`), each the same arithmetic as the torch ops it replaces:
~25 ops a layer fewer, a single-stream step 7.7 -> 5.6 ms on a 2-core Zen 4 (medians, noisy).

torch 2.13 marks torch.jit.script deprecated: if a later torch drops it, the same functions run as
plain Python, correct and ~2 ms a step slower.

The model's layers are flattened once into lists (`DecodePlan`): per projection a kind, its
weights and scales, per norm its weight.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from amber.engine import paged_ops
from amber.engine.models.layers import lora_add, paged_attend
from amber.engine.quantize import DENSE_DTYPES, Int4Linear, Int8Linear, dense_product

log = logging.getLogger(__name__)

# projection kinds (plain ints: TorchScript takes them as they are)
PLAIN, DENSE_BF16, INT4, INT4_AMBER, INT8 = 0, 1, 4, 5, 8  # INT4: torch's kernel; INT4_AMBER: paged_ops'


def rms_norm(x: torch.Tensor, weight: torch.Tensor, doubled: torch.Tensor, eps: float,
             compiled: bool) -> torch.Tensor:
    """RMSNorm over the last dimension, which llama.RMSNorm runs too; `doubled` is [w, w] in fp32.
    `compiled`: Amber's CPU ops are loaded and x is on the CPU (as the decode step's `kernel`).

    fp32 rows take one op, paged_ops' rms_norm, where compiled: torch's rms_norm is ~8 ops on the
    CPU, which for a single row cost more than their arithmetic, 61 times a decode step. Without
    it, one row takes one kernel still: [x, -x] has mean 0 and variance mean(x^2), so the first
    half of its layer norm is x * rsqrt(mean(x^2) + eps), scaled by the weight. Reduced precision
    normalises in fp32, as the reference implementation does."""
    if x.dtype == torch.float32:
        if compiled and weight.dtype == torch.float32:
            return torch.ops.amber.rms_norm(x, weight, eps)
        if x.dim() == 2 and x.shape[0] == 1:
            twice = torch.cat([x, -x], dim=-1)
            return F.layer_norm(twice, [doubled.shape[0]], doubled, None, eps)[:, :x.shape[1]]
        return F.rms_norm(x, [weight.shape[0]], weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, doubled: torch.Tensor, eps: float,
                 compiled: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm of it): a residual add and the norm after it, one op where both are
    fp32 and compiled (the same two results: one fp32 add, then rms_norm's arithmetic)."""
    if compiled and x.dtype == torch.float32 and delta.dtype == torch.float32 and weight.dtype == torch.float32:
        total, normed = torch.ops.amber.add_rms_norm(x, delta, weight, eps)
        return total, normed
    x = x + delta
    return x, rms_norm(x, weight, doubled, eps, compiled)


def _project(kind: int, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, dense: torch.Tensor,
             max_rows: int, group: int, wide: bool = False) -> torch.Tensor:
    """A projection of several rows, as quantize.py's layers compute it (QuantizedLinear.forward):
    their fused kernel for up to `max_rows` rows, else their dense copy (bf16 or fp32; kernels.py
    chose). `wide`: Amber's int4 kernel gives its bf16 values widened to fp32, for a result that
    meets fp32 at once (RoPE, the residual stream): the same numbers, without a cast per use."""
    if kind == 0:  # PLAIN
        return F.linear(x, weight)
    if kind == 5 and x.shape[0] > max_rows and dense.numel() == 0:  # dense weights made per product, in dense's dtype
        return torch.ops.amber.int4_mm_dense(x, weight, scales, group, dense.dtype == torch.float32)
    if kind == 1 or x.shape[0] > max_rows:
        return dense_product(x, dense)
    if kind == 5:  # INT4_AMBER, which rounds an fp32 x to bf16 itself
        return torch.ops.amber.int4_mm(x, weight, scales, group, wide)
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    if kind == 4:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, scales)
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


def _attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_pool: torch.Tensor,
               value_pool: torch.Tensor, write_rows: torch.Tensor, read_rows: torch.Tensor, mask: Optional[torch.Tensor],
               tables: torch.Tensor, lengths: torch.Tensor, block_size: int, kernel: bool, heads: int, kv_heads: int,
               head_dim: int) -> torch.Tensor:
    """A layer's attention from its qkv projection (batch, (heads + 2 kv_heads) * head_dim), as
    llama.Attention computes it: rotate q and k (layers.apply_rope), store k and v, attend
    (layers.paged_attend). Returns (batch, heads * head_dim) in the pools' dtype. Where the compiled
    kernel runs and the residual stream is fp32 (every quantized mode), one op does all of it
    (paged_ops' paged_rope_attention, the same arithmetic): ~20 small ops fewer per layer."""
    if kernel and qkv.dtype == torch.float32:
        return torch.ops.amber.paged_rope_attention(qkv, cos, sin, key_pool, value_pool, write_rows, tables,
                                                    lengths, block_size, heads, head_dim ** -0.5, 0)
    half = head_dim // 2
    qkv = qkv.view(-1, heads + 2 * kv_heads, head_dim)
    qk = qkv[:, :heads + kv_heads]
    qk = torch.addcmul(qk * cos, torch.cat([qk[:, :, half:], qk[:, :, :half]], dim=-1), sin)
    v = qkv[:, heads + kv_heads:]
    if qk.dtype != key_pool.dtype:
        qk = qk.to(key_pool.dtype)
    if v.dtype != value_pool.dtype:
        v = v.to(value_pool.dtype)
    return paged_attend(qk[:, :heads], qk[:, heads:], v, key_pool, value_pool, write_rows, read_rows, mask,
                        tables, lengths, block_size, kernel, None, 0)


def decode_layers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, write_rows: torch.Tensor,
                  read_rows: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, block_size: int,
                  kernel: bool, ops: bool, heads: int, kv_heads: int, head_dim: int, eps: float, group: int,
                  kinds: List[int], weights: List[torch.Tensor], scales: List[torch.Tensor], dense: List[torch.Tensor],
                  max_rows: List[int], norms: List[torch.Tensor], doubled_norms: List[torch.Tensor],
                  keys: List[torch.Tensor], values: List[torch.Tensor]) -> torch.Tensor:
    """decode_rows for one sequence without an adapter: x (1, hidden) through every layer.
    Single-stream decode is the step where per-op cost weighs most: without decode_rows' batch
    reshapes and LoRA checks it runs ~0.5 ms a token faster (measured in turns). The cache
    arguments are kv_cache.BatchCache's (paged_attend says which it reads); `ops`: Amber's compiled
    ops are loaded and x is on the CPU, so norms run as llama.RMSNorm runs them (`rms_norm`)."""
    wide, layers = x.dtype == torch.float32, len(keys)  # wide: int4 products as fp32 (_project)
    h = rms_norm(x, norms[0], doubled_norms[0], eps, ops)
    for i in range(layers):
        p = 4 * i
        qkv = _project(kinds[p], h, weights[p], scales[p], dense[p], max_rows[p], group, wide)
        out = _attention(qkv, cos, sin, keys[i], values[i], write_rows, read_rows, None, tables, lengths,
                         block_size, kernel, heads, kv_heads, head_dim)
        o = _project(kinds[p + 1], out, weights[p + 1], scales[p + 1], dense[p + 1], max_rows[p + 1], group, wide)
        x, h = add_rms_norm(x, o, norms[2 * i + 1], doubled_norms[2 * i + 1], eps, ops)
        gate, up = _project(kinds[p + 2], h, weights[p + 2], scales[p + 2], dense[p + 2], max_rows[p + 2],
                            group).chunk(2, dim=-1)
        down = _project(kinds[p + 3], F.silu(gate) * up, weights[p + 3], scales[p + 3], dense[p + 3],
                        max_rows[p + 3], group, wide)
        if i + 1 < layers:  # the next layer's first norm, with this add
            x, h = add_rms_norm(x, down, norms[2 * i + 2], doubled_norms[2 * i + 2], eps, ops)
        else:
            x = x + down
    return x


def decode_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, write_rows: torch.Tensor,
                read_rows: torch.Tensor, mask: Optional[torch.Tensor], tables: torch.Tensor, lengths: torch.Tensor,
                block_size: int, kernel: bool, ops: bool,
                heads: int, kv_heads: int, head_dim: int, eps: float, group: int, kinds: List[int],
                weights: List[torch.Tensor], scales: List[torch.Tensor], dense: List[torch.Tensor],
                max_rows: List[int], norms: List[torch.Tensor], doubled_norms: List[torch.Tensor],
                keys: List[torch.Tensor], values: List[torch.Tensor],
                lora_a: List[torch.Tensor], lora_bt: List[List[torch.Tensor]],
                lora_mask: Optional[torch.Tensor], lora_lanes: Optional[torch.Tensor]) -> torch.Tensor:
    """x (batch, hidden): one new token for each of `batch` sequences; the cache arguments are
    kv_cache.BatchCache's (write_rows, read_rows, tables, lengths, kernel) and attention_mask's mask
    (batch, 1, 1, context) or None; `ops` as decode_layers'. lora_a, lora_bt, lora_mask, lora_lanes: a LoraBatch's a, bt, mask and lanes per
    projection (qkv, o, gate_up, down), or empty lists when no row has an adapter."""
    lora, wide, layers = len(lora_a) > 0, x.dtype == torch.float32, len(keys)
    h = rms_norm(x, norms[0], doubled_norms[0], eps, ops)
    for i in range(layers):
        p = 4 * i
        qkv = _project(kinds[p], h, weights[p], scales[p], dense[p], max_rows[p], group, wide)
        if lora:
            qkv = lora_add(h, qkv, lora_a[0][i], lora_bt[0], i, lora_mask, lora_lanes)
        out = _attention(qkv, cos, sin, keys[i], values[i], write_rows, read_rows, mask, tables, lengths,
                         block_size, kernel, heads, kv_heads, head_dim)
        o = _project(kinds[p + 1], out, weights[p + 1], scales[p + 1], dense[p + 1], max_rows[p + 1], group, wide)
        if lora:
            o = lora_add(out, o, lora_a[1][i], lora_bt[1], i, lora_mask, lora_lanes)
        x, h = add_rms_norm(x, o, norms[2 * i + 1], doubled_norms[2 * i + 1], eps, ops)
        gate_up = _project(kinds[p + 2], h, weights[p + 2], scales[p + 2], dense[p + 2], max_rows[p + 2], group)
        if lora:
            gate_up = lora_add(h, gate_up, lora_a[2][i], lora_bt[2], i, lora_mask, lora_lanes)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        down = _project(kinds[p + 3], hidden, weights[p + 3], scales[p + 3], dense[p + 3], max_rows[p + 3],
                        group, wide)
        if lora:
            down = lora_add(hidden, down, lora_a[3][i], lora_bt[3], i, lora_mask, lora_lanes)
        if i + 1 < layers:  # the next layer's first norm, with this add
            x, h = add_rms_norm(x, down, norms[2 * i + 2], doubled_norms[2 * i + 2], eps, ops)
        else:
            x = x + down
    return x


_scripted: dict = {}  # function name -> its TorchScript compilation (or itself)


def scripted(fn):
    """`fn` compiled by TorchScript once per process, or `fn` itself if that fails."""
    if fn.__name__ not in _scripted:
        paged_ops.ensure()  # TorchScript resolves the attention op when it compiles
        try:
            with warnings.catch_warnings():  # the deprecation, said once in the module docstring
                warnings.simplefilter("ignore", DeprecationWarning)
                _scripted[fn.__name__] = torch.jit.script(fn)
        except Exception:  # a torch without TorchScript: the same code, run by Python
            log.warning("TorchScript could not compile %s; decode steps run eagerly", fn.__name__, exc_info=True)
            _scripted[fn.__name__] = fn
    return _scripted[fn.__name__]


@dataclass
class DecodePlan:
    """The model's layers as decode_rows and decode_layers take them, flattened once."""
    group: int
    kinds: list[int]
    weights: list[torch.Tensor]
    scales: list[torch.Tensor]
    dense: list[torch.Tensor]       # what a projection multiplies by above max_rows rows (bf16 or fp32)
    max_rows: list[int]
    norms: list[torch.Tensor]
    doubled_norms: list[torch.Tensor]  # [w, w] (rms_norm's one-row kernel)


def _projection(linear: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(kind, weight, scales, dense copy, kernel's row limit, int4 group) for one projection,
    computing what its forward() does."""
    none, unlimited = torch.empty(0), 1 << 30
    if isinstance(linear, Int4Linear):
        if linear.kernel is None:  # off CPU: the bf16 copy
            return DENSE_BF16, linear.dense, none, linear.dense, 0, 0
        dense = linear.dense if linear.dense is not None else none  # none: the kernel takes every row count
        if linear.made:  # made per product: an empty tensor of the dtype to make them in
            dense = torch.empty(0, dtype=DENSE_DTYPES[linear.made])
        kind = INT4_AMBER if linear.kernel == "amber" else INT4
        return kind, linear.packed, linear.scales_zeros, dense, linear.fused_max_rows, linear.group
    if isinstance(linear, Int8Linear):
        assert linear.weight.shape[0] == 1, "block projections have one scale group"
        dense = linear.dense if linear.dense is not None else none
        return INT8, linear.weight[0], linear.scales[0], dense, linear.fused_max_rows, 0
    return PLAIN, linear.weight, none, linear.weight, unlimited, 0


def build_plan(layers: nn.ModuleList) -> DecodePlan:
    plan, groups = DecodePlan(0, [], [], [], [], [], [], []), {0}
    for layer in layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            kind, weight, scales, dense, max_rows, group = _projection(linear)
            plan.kinds.append(kind)
            plan.weights.append(weight)
            plan.scales.append(scales)
            plan.dense.append(dense)
            plan.max_rows.append(max_rows)
            groups.add(group)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            plan.norms.append(norm.weight)
            plan.doubled_norms.append(norm.doubled())
    assert len(groups) <= 2, "one int4 group size per model"
    plan.group = max(groups)
    return plan
