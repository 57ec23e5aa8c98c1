"""The Llama family (SmolLM2, Llama 2/3, Mistral-style GQA): architecture and its declaration.

Parameter names follow Hugging Face's LlamaForCausalLM, except that q/k/v and gate/up projections
are fused (`qkv_proj`, `gate_up_proj`: fewer, larger matmuls per step, as vLLM does); `FAMILY.fused`
says how, and the loader and LoRA map HF and PEFT names onto them, so HF checkpoints and PEFT
adapters still load. The model does not own its KV memory: `forward` takes a `KVCache` and, for
each batch row, the cache slot and the positions of the new tokens, writes their keys/values there
and attends over the slot's prefix. `forward_one` and `forward_rows` are the fast decode path
(llama_decode.py). Loading, dtype and quantization live in `loader.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from amber.engine import paged_ops
from amber.engine.kv_cache import KVCache
from amber.engine.models.family import Family, FullAttention
from amber.engine.models.layers import (CausalLM, LayerInputs, apply_rope, attend, attention_mask, gather_rows,
                                        inverse_frequencies, rope_cos_sin, with_lora)
from amber.engine.models.llama_decode import (DecodePlan, build_plan, decode_layers, decode_rows, rms_norm,
                                              scripted)

if TYPE_CHECKING:
    from amber.engine.lora import LoraBatch


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> LlamaConfig:
        """Read a Hugging Face config.json (transformers 4.x or 5.x spelling of RoPE settings)."""
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"RoPE type {rope_type!r} is not supported yet")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
        )


def fused(cfg: LlamaConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    """Fused module -> the HF modules stacked (in order) along its output dimension, with widths."""
    q, kv, mlp = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    return {"self_attn.qkv_proj": (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)),
            "mlp.gate_up_proj": (("mlp.gate_proj", mlp), ("mlp.up_proj", mlp))}


# the projections a LoRA adapter can add to (lora.py), in a fixed order: the index names one
LORA_TARGETS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
QKV, O_PROJ, GATE_UP, DOWN = range(len(LORA_TARGETS))
PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the same, HF's names


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self._doubled: torch.Tensor | None = None  # [weight, weight], made at first use (after loading)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # llama_decode.py says how; Amber's CPU op where loaded, as the decode step runs it
        return rms_norm(x, self.weight, self.doubled(), self.eps, compiled_ops(x))

    def doubled(self) -> torch.Tensor:
        """[weight, weight], the one-row kernel's layer_norm weight; made at first use (after loading)."""
        if self._doubled is None or self._doubled.device != self.weight.device:
            self._doubled = torch.cat([self.weight, self.weight]).detach()
        return self._doubled


def compiled_ops(x: torch.Tensor) -> bool:
    """Whether Amber's compiled CPU ops run on x: loaded (paged_ops), and x on the CPU."""
    return paged_ops.ensure() and x.device.type == "cpu"


def rope_tables(cfg: LlamaConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin, (length, head_dim), in fp32: rotate-half's negation lives in sin."""
    return rope_cos_sin(inverse_frequencies(cfg.rope_theta, cfg.head_dim), torch.arange(length))


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, inputs: LayerInputs, lora: LoraBatch | None) -> torch.Tensor:
        """x: (tokens, hidden), the batch's rows one after another; attention alone needs them
        as (batch, seq), which `inputs.cache.shape` holds."""
        qkv = with_lora(lora, self.layer, QKV, x, self.qkv_proj(x))
        qkv = qkv.view(-1, self.heads + 2 * self.kv_heads, self.head_dim)
        # q and k rotate together, in the residual stream's dtype (cos's): in fp32 beside int8 or
        # int4 weights, whose outputs come in bf16 (rotating in bf16 moved int8's logprobs 7% more).
        qk = apply_rope(qkv[:, :self.heads + self.kv_heads], inputs.cos, inputs.sin)
        out = attend(inputs.cache, self.layer, qk[:, :self.heads], qk[:, self.heads:],
                     qkv[:, self.heads + self.kv_heads:], inputs.mask)
        return with_lora(lora, self.layer, O_PROJ, out, self.o_proj(out))  # (tokens, hidden)


class MLP(nn.Module):
    """The gated MLP: down(act(gate x) * up x); SiLU for Llama (SwiGLU), tanh GELU for Gemma (GeGLU)."""

    def __init__(self, cfg: LlamaConfig, layer: int, act: Callable[[torch.Tensor], torch.Tensor] = F.silu):
        super().__init__()
        self.layer, self.act = layer, act
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        gate, up = with_lora(lora, self.layer, GATE_UP, x, self.gate_up_proj(x)).chunk(2, dim=-1)
        hidden = self.act(gate) * up
        return with_lora(lora, self.layer, DOWN, hidden, self.down_proj(hidden))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, inputs: LayerInputs, lora: LoraBatch | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg, [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)],
                         RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self._plan: DecodePlan | None = None  # forward_one's and forward_rows', made at first use

    def position_tables(self) -> dict[str, torch.Tensor]:
        cos, sin = rope_tables(self.config, self.config.max_position_embeddings)
        return {"rope_cos": cos, "rope_sin": sin}

    def forward_one(self, token: int, position: int, slot: int, cache: KVCache) -> torch.Tensor:
        """forward_rows for one sequence without an adapter, in any slot: hidden (1, hidden), by
        llama_decode.decode_layers (single-stream decode)."""
        cfg, plan = self.config, self._decode_plan()
        batch = cache.batch(torch.tensor([slot]), torch.tensor([[position]]))
        x = self.model.embed_tokens(torch.tensor([token], device=self.rope_cos.device))
        x = scripted(decode_layers)(
            x, self.rope_cos[position].to(x.dtype), self.rope_sin[position].to(x.dtype), batch.write_rows,
            batch.decode_rows, *batch.tables, cache.block_size, batch.kernel, compiled_ops(x),
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps, plan.group,
            plan.kinds, plan.weights, plan.scales, plan.dense, plan.max_rows, plan.norms, plan.doubled_norms,
            cache.layer_keys, cache.layer_values)
        return self.model.norm(x)

    def forward_rows(self, tokens: list[int], positions: list[int], cache: KVCache,
                     lora: LoraBatch | None = None) -> torch.Tensor:
        """forward() for one new token of each of n sequences, in cache slots 0..n-1, with the rows'
        adapters if any: hidden (n, hidden), op for op as forward() computes it, by one
        TorchScript function (llama_decode.py): a decode step, where per-op cost sets the speed."""
        cfg, plan, device = self.config, self._decode_plan(), self.rope_cos.device
        at = torch.tensor(positions, device=device).unsqueeze(1)  # (batch, 1)
        batch = cache.batch(slice(0, len(tokens)), at)
        x = self.model.embed_tokens(torch.tensor(tokens, device=device))
        x = scripted(decode_rows)(
            x, *gather_rows(self.rope_cos, self.rope_sin, at, x.dtype), batch.write_rows, batch.decode_rows,
            attention_mask(at, batch.context), *batch.tables, cache.block_size, batch.kernel, compiled_ops(x),
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps, plan.group,
            plan.kinds, plan.weights, plan.scales, plan.dense, plan.max_rows, plan.norms, plan.doubled_norms,
            cache.layer_keys, cache.layer_values,
            lora.a if lora else [], lora.bt if lora else [], lora.mask if lora else None,
            lora.lanes if lora else None)
        return self.model.norm(x)

    def _decode_plan(self) -> DecodePlan:
        if self._plan is None:  # at first use: after loading and quantization
            self._plan = build_plan(self.model.layers)
        return self._plan


FAMILY = Family(
    name="llama", model_types=("llama", "mistral"), config=LlamaConfig.from_hf, model=LlamaForCausalLM,
    renames=(), hf_layers="model.layers", fused=fused, lora_targets=LORA_TARGETS,
    peft_targets=PEFT_TARGETS,
    layer_states=lambda cfg: [FullAttention(cfg.num_key_value_heads, cfg.head_dim)] * cfg.num_hidden_layers)
