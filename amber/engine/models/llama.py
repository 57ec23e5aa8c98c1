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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from amber.engine.kv_cache import BatchCache, KVCache
from amber.engine.models.family import Family, FullAttention
from amber.engine.models.layers import attention_mask, with_lora
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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self._doubled: torch.Tensor | None = None  # [weight, weight], made at first use (after loading)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.doubled(), self.eps)  # llama_decode.py, which says how

    def doubled(self) -> torch.Tensor:
        """[weight, weight], the one-row kernel's layer_norm weight; made at first use (after loading)."""
        if self._doubled is None or self._doubled.device != self.weight.device:
            self._doubled = torch.cat([self.weight, self.weight]).detach()
        return self._doubled


def rope_tables(cfg: LlamaConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin, (length, head_dim), in fp32: rotate-half's negation lives in sin."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    sin = angles.sin()
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); cos/sin: (tokens, 1, head_dim) in x's dtype, with sin's first
    half negated. HF's rotate-half layout."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat([x[..., half:], x[..., :half]], dim=-1), sin)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: BatchCache, mask, lora: LoraBatch | None) -> torch.Tensor:
        """x: (tokens, hidden), the batch's rows one after another; attention alone needs them
        as (batch, seq), which `cache.shape` holds."""
        batch, seq = cache.shape
        qkv = with_lora(lora, self.layer, QKV, x, self.qkv_proj(x))
        qkv = qkv.view(-1, self.heads + 2 * self.kv_heads, self.head_dim)
        # q and k rotate together, in the residual stream's dtype (cos's): in fp32 beside int8 or
        # int4 weights, whose outputs come in bf16 (rotating in bf16 moved int8's logprobs 7% more).
        # Attention then runs in the cache's dtype, which may be below it.
        qk = apply_rope(qkv[:, :self.heads + self.kv_heads], cos, sin)
        v = qkv[:, self.heads + self.kv_heads:]
        if qk.dtype != cache.dtype:
            qk = qk.to(cache.dtype)
        if v.dtype != cache.dtype:
            v = v.to(cache.dtype)
        keys, values = cache.write_and_read(self.layer, qk[:, self.heads:], v)
        q = qk[:, :self.heads].view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        out = out.transpose(1, 2).reshape(batch * seq, -1)
        return with_lora(lora, self.layer, O_PROJ, out, self.o_proj(out))  # (tokens, hidden)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        gate, up = with_lora(lora, self.layer, GATE_UP, x, self.gate_up_proj(x)).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        return with_lora(lora, self.layer, DOWN, hidden, self.down_proj(hidden))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache: BatchCache, mask, lora: LoraBatch | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.kv_dtype: torch.dtype | None = None  # KV cache and attention dtype; None: the weights'
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._plan: DecodePlan | None = None  # forward_one's and forward_rows', made at first use
        self.kernels: dict = {}  # layer shape -> kernels.Choice, when kernels.tune chose them
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_buffers(self) -> None:
        """(Re)make the RoPE tables on the CPU, in fp32: the loader builds the model on meta."""
        self.rope_cos, self.rope_sin = rope_tables(self.config, self.config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | slice, lora: LoraBatch | None = None) -> torch.Tensor:
        """Hidden states (batch, seq, hidden) after the final norm.

        input_ids, positions: (batch, seq), each row's positions contiguous and increasing;
        slots: the cache slot of each row, (batch,), or a slice for consecutive slots (no gather).
        Row b attends to its slot's positions <= its own. `lora`: the rows' adapters, if any has one.
        """
        # Rows travel as (tokens, hidden): every layer but attention treats tokens alike, and the
        # matmul kernels take 2-D inputs, so no reshape is paid per projection.
        x = self.model.embed_tokens(input_ids.flatten())
        batch = cache.batch(slots, positions)
        mask = attention_mask(positions, batch.context)
        cos = self.rope_cos[positions.flatten()].unsqueeze(1).to(x.dtype)  # (tokens, 1, head_dim)
        sin = self.rope_sin[positions.flatten()].unsqueeze(1).to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch, mask, lora)
        return self.model.norm(x).view(*input_ids.shape, -1)

    def forward_one(self, token: int, position: int, slot: int, cache: KVCache) -> torch.Tensor:
        """forward_rows for one sequence without an adapter, in any slot: hidden (1, hidden), by
        llama_decode.decode_layers (single-stream decode)."""
        cfg, plan = self.config, self._decode_plan()
        x = self.model.embed_tokens.weight[token].unsqueeze(0)
        x = scripted(decode_layers)(
            x, self.rope_cos[position].to(x.dtype), self.rope_sin[position].to(x.dtype), position, slot,
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
        context = max(positions) + 1
        x = self.model.embed_tokens(torch.tensor(tokens, device=device))
        x = scripted(decode_rows)(
            x, self.rope_cos[at.flatten()].unsqueeze(1).to(x.dtype), self.rope_sin[at.flatten()].unsqueeze(1).to(x.dtype),
            torch.arange(len(tokens), device=device).unsqueeze(1), at, context, attention_mask(at, context),
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps, plan.group,
            plan.kinds, plan.weights, plan.scales, plan.dense, plan.max_rows, plan.norms, plan.doubled_norms,
            cache.token_keys, cache.token_values, cache.layer_keys, cache.layer_values,
            lora.a if lora else [], lora.bt if lora else [], lora.mask if lora else None)
        return self.model.norm(x)

    def _decode_plan(self) -> DecodePlan:
        if self._plan is None:  # at first use: after loading and quantization
            self._plan = build_plan(self.model.layers)
        return self._plan

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits in fp32, whatever the weights' dtype."""
        return self.lm_head(hidden).float()


FAMILY = Family(
    name="llama", model_types=("llama", "mistral"), config=LlamaConfig.from_hf, model=LlamaForCausalLM,
    renames=(), hf_layers="model.layers", fused=fused, lora_targets=LORA_TARGETS,
    peft_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    layer_states=lambda cfg: [FullAttention(cfg.num_key_value_heads, cfg.head_dim)] * cfg.num_hidden_layers)
