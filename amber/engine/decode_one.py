"""Decode steps without adapters: one new token per sequence through every layer, as one
TorchScript function (`decode_layers` for a single sequence, `decode_rows` for a batch).

These steps are where per-op cost, not arithmetic, sets the speed: a step is ~1,000 small ops
around 121 matmuls, and in eager mode each op costs ~2-3 us of Python and dispatch. Run by
TorchScript's interpreter, the layers of SmolLM2-135M int4 take 6.8 ms instead of 9.0 ms for one
sequence, and a whole single-stream step 10.7 ms instead of 12.7 (measured; torch.compile was
slower here: 16 ms a step compiled layer by layer, after 30-90 s of compiling on 2 cores). Each
function computes exactly what `LlamaForCausalLM.forward` computes for those tokens, op for op
(tests/engine/test_precision.py checks they agree bit for bit, in every precision mode).
TorchScript releases the GIL while it runs, as eager ops do, so the HTTP thread is not held up.
LoRA adapters' updates run inside the batch function, as lora.LoraBatch.add computes them.

torch 2.13 marks torch.jit.script deprecated: if a later torch drops it, the same functions run as
plain Python, correct and ~2 ms a step slower.

The model's layers are flattened once into lists (`DecodePlan`): per projection a kind, its
weights and scales, per norm its weight.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from amber.engine.quantize import Int4Linear, Int8Linear

log = logging.getLogger(__name__)

# projection kinds (plain ints: TorchScript takes them as they are)
PLAIN, DENSE_BF16, INT4, INT8 = 0, 1, 4, 8


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of one row, as model.RMSNorm computes it; in fp32 `weight` is [w, w] (one_row)."""
    if x.dtype == torch.float32:
        twice = torch.cat([x, -x], dim=-1)
        return F.layer_norm(twice, [weight.shape[0]], weight, None, eps)[:, :x.shape[1]]
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _project(kind: int, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """A projection of one row, as nn.Linear or quantize.py's layers compute it for one row."""
    if kind == 0:  # PLAIN
        return F.linear(x, weight)
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    if kind == 1:  # DENSE_BF16
        return F.linear(x, weight)
    if kind == 4:  # INT4
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, scales)
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


def decode_layers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: int, slot: int,
                  heads: int, kv_heads: int, head_dim: int, eps: float, group: int, kinds: List[int],
                  weights: List[torch.Tensor], scales: List[torch.Tensor], norms: List[torch.Tensor],
                  keys: List[torch.Tensor], values: List[torch.Tensor]) -> torch.Tensor:
    """x (1, hidden) through every layer; writes the token's keys and values into `slot`."""
    half = head_dim // 2
    for i in range(len(keys)):
        p, k_cache, v_cache = 4 * i, keys[i], values[i]  # caches: (slots, kv_heads, len, head_dim)
        qkv = _project(kinds[p], _norm(x, norms[2 * i], eps), weights[p], scales[p], group)
        qkv = qkv.view(heads + 2 * kv_heads, head_dim)
        qk = qkv[:heads + kv_heads]
        qk = torch.addcmul(qk * cos, torch.cat([qk[:, half:], qk[:, :half]], dim=-1), sin)
        if qk.dtype != k_cache.dtype:
            qk = qk.to(k_cache.dtype)
        k_cache[slot, :, position] = qk[heads:]
        v_cache[slot, :, position] = qkv[heads + kv_heads:]
        out = F.scaled_dot_product_attention(
            qk[:heads].view(1, heads, 1, head_dim), k_cache[slot:slot + 1, :, :position + 1],
            v_cache[slot:slot + 1, :, :position + 1], enable_gqa=heads != kv_heads)
        x = x + _project(kinds[p + 1], out.view(1, heads * head_dim), weights[p + 1], scales[p + 1], group)
        gate_up = _project(kinds[p + 2], _norm(x, norms[2 * i + 1], eps), weights[p + 2], scales[p + 2], group)
        gate, up = gate_up.chunk(2, dim=-1)
        x = x + _project(kinds[p + 3], F.silu(gate) * up, weights[p + 3], scales[p + 3], group)
    return x


def _norm_rows(x: torch.Tensor, weight: torch.Tensor, doubled: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of any number of rows, as model.RMSNorm computes it (one_row's kernel for one)."""
    if x.dtype == torch.float32:
        if x.shape[0] == 1:
            return _norm(x, doubled, eps)
        return F.rms_norm(x, [weight.shape[0]], weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _project_rows(kind: int, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, dense: torch.Tensor,
                  max_rows: int, group: int) -> torch.Tensor:
    """A projection of several rows, as quantize.py's layers choose: their kernel for up to
    `max_rows` rows, else their bf16 copy."""
    if kind == 0:  # PLAIN
        return F.linear(x, weight)
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    if kind == 1 or x.shape[0] > max_rows:
        return F.linear(x, dense)
    if kind == 4:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, scales)
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


def _lora_add(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bts: List[torch.Tensor], layer: int,
              mask: Optional[torch.Tensor]) -> torch.Tensor:
    """lora.LoraBatch.add: y plus each row's adapter update; a (parts * n * r, in) this layer's,
    bts per part (layers, n * r, out of the part)."""
    h = x.reshape(-1, x.shape[-1]).to(a.dtype) @ a.t()
    y = y.to(a.dtype)
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


def decode_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
                positions: torch.Tensor, context: int, mask: Optional[torch.Tensor],
                heads: int, kv_heads: int, head_dim: int, eps: float, group: int, kinds: List[int],
                weights: List[torch.Tensor], scales: List[torch.Tensor], dense: List[torch.Tensor],
                max_rows: List[int], norms: List[torch.Tensor], doubled_norms: List[torch.Tensor],
                token_keys: List[torch.Tensor], token_values: List[torch.Tensor], keys: List[torch.Tensor],
                values: List[torch.Tensor],
                lora_a: List[torch.Tensor], lora_bt: List[List[torch.Tensor]],
                lora_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x (batch, hidden): one new token for each of `batch` sequences in slots 0..batch-1, at
    `positions` (batch, 1); rows (batch, 1) their slots; mask (batch, 1, 1, context) or None.
    lora_a, lora_bt, lora_mask: a LoraBatch's a, bt and mask per projection (qkv, o, gate_up,
    down), or empty lists when no row has an adapter."""
    half, batch, lora = head_dim // 2, x.shape[0], len(lora_a) > 0
    for i in range(len(keys)):
        p = 4 * i
        h = _norm_rows(x, norms[2 * i], doubled_norms[2 * i], eps)
        qkv = _project_rows(kinds[p], h, weights[p], scales[p], dense[p], max_rows[p], group)
        if lora:
            qkv = _lora_add(h, qkv, lora_a[0][i], lora_bt[0], i, lora_mask)
        qkv = qkv.view(-1, heads + 2 * kv_heads, head_dim)
        qk = qkv[:, :heads + kv_heads]
        qk = torch.addcmul(qk * cos, torch.cat([qk[:, :, half:], qk[:, :, :half]], dim=-1), sin)
        v = qkv[:, heads + kv_heads:]
        if qk.dtype != keys[i].dtype:
            qk = qk.to(keys[i].dtype)
        if v.dtype != values[i].dtype:
            v = v.to(values[i].dtype)
        token_keys[i].index_put_([rows, positions], qk[:, heads:].view(batch, 1, kv_heads, head_dim))
        token_values[i].index_put_([rows, positions], v.view(batch, 1, kv_heads, head_dim))
        q = qk[:, :heads].view(batch, 1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys[i][0:batch, :, :context], values[i][0:batch, :, :context],
                                             attn_mask=mask, enable_gqa=heads != kv_heads)
        out = out.transpose(1, 2).reshape(batch, -1)
        o = _project_rows(kinds[p + 1], out, weights[p + 1], scales[p + 1], dense[p + 1], max_rows[p + 1], group)
        if lora:
            o = _lora_add(out, o, lora_a[1][i], lora_bt[1], i, lora_mask)
        x = x + o
        h = _norm_rows(x, norms[2 * i + 1], doubled_norms[2 * i + 1], eps)
        gate_up = _project_rows(kinds[p + 2], h, weights[p + 2], scales[p + 2], dense[p + 2], max_rows[p + 2], group)
        if lora:
            gate_up = _lora_add(h, gate_up, lora_a[2][i], lora_bt[2], i, lora_mask)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        down = _project_rows(kinds[p + 3], hidden, weights[p + 3], scales[p + 3], dense[p + 3], max_rows[p + 3],
                             group)
        if lora:
            down = _lora_add(hidden, down, lora_a[3][i], lora_bt[3], i, lora_mask)
        x = x + down
    return x


_compiled = None
_compiled_rows = None


def compiled_decode_layers():
    """decode_layers compiled by TorchScript once per process, or itself if that fails."""
    global _compiled
    if _compiled is None:
        try:
            with warnings.catch_warnings():  # the deprecation, said once in the module docstring
                warnings.simplefilter("ignore", DeprecationWarning)
                _compiled = torch.jit.script(decode_layers)
        except Exception:  # a torch without TorchScript: the same code, run by Python
            log.warning("TorchScript could not compile decode_layers; single-stream decode runs eagerly",
                        exc_info=True)
            _compiled = decode_layers
    return _compiled


def compiled_decode_rows():
    """decode_rows compiled by TorchScript once per process, or itself if that fails."""
    global _compiled_rows
    if _compiled_rows is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _compiled_rows = torch.jit.script(decode_rows)
        except Exception:
            log.warning("TorchScript could not compile decode_rows; batched decode runs eagerly", exc_info=True)
            _compiled_rows = decode_rows
    return _compiled_rows


@dataclass
class DecodePlan:
    """The model's layers as decode_layers takes them, flattened once."""
    group: int
    kinds: list[int]
    weights: list[torch.Tensor]
    scales: list[torch.Tensor]
    dense: list[torch.Tensor]       # what a projection multiplies by above max_rows rows
    max_rows: list[int]
    norms: list[torch.Tensor]       # one_row's: [w, w] in fp32
    row_norms: list[torch.Tensor]   # the weights themselves


def _projection(linear: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(kind, weight, scales, dense copy, kernel's row limit, int4 group) for one projection,
    computing what its forward() does."""
    none, unlimited = torch.empty(0), 1 << 30
    if isinstance(linear, Int4Linear):
        if linear.packed is None:  # off CPU: the bf16 copy
            return DENSE_BF16, linear.dense, none, linear.dense, 0, 0
        return INT4, linear.packed, linear.scales_zeros, linear.dense, linear.fused_max_rows, linear.group
    if isinstance(linear, Int8Linear):
        assert linear.weight.shape[0] == 1, "block projections have one scale group"
        return INT8, linear.weight[0], linear.scales[0], linear.dense, linear.fused_max_rows, 0
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
            plan.norms.append(norm.doubled() if norm.weight.dtype == torch.float32 else norm.weight)
            plan.row_norms.append(norm.weight)
    assert len(groups) <= 2, "one int4 group size per model"
    plan.group = max(groups)
    return plan
