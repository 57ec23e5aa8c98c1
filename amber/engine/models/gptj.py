"""The GPT-J family (EleutherAI GPT-J 6B and its relatives): architecture and its declaration.

Each block runs attention and the MLP side by side from one LayerNorm (ln_1) and adds both to the
residual. Rotary embeddings cover the first `rotary_dim` dimensions of each head, in GPT-J's
interleaved layout (pairs (x0, x1), (x2, x3)... rotate: `rotate_every_two`), not Llama's halves.
q/k/v and out_proj have no bias; fc_in, fc_out and the untied lm_head do.

Parameter names inside a layer are Hugging Face's (ln_1, attn.out_proj, mlp.fc_in...), except that
q/k/v are fused into `attn.qkv_proj`; the top level is renamed to the shared layout
(transformer.wte -> model.embed_tokens, transformer.h -> model.layers, transformer.ln_f ->
model.norm). There is no fast decode path: decode steps run `forward` (the runner falls back).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from amber.engine.models.family import Family, FullAttention
from amber.engine.models.layers import CausalLM, LayerInputs, attend, with_lora

if TYPE_CHECKING:
    from amber.engine.lora import LoraBatch

ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


@dataclass(frozen=True)
class GPTJConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rotary_dim: int
    layer_norm_eps: float
    max_position_embeddings: int
    activation: str
    tie_word_embeddings: bool
    bos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:  # every head has its own keys and values
        return self.num_attention_heads

    @classmethod
    def from_hf(cls, cfg: dict) -> GPTJConfig:
        hidden, heads = cfg["n_embd"], cfg["n_head"]
        if cfg.get("activation_function", "gelu_new") not in ACTIVATIONS:
            raise ValueError(f"GPT-J activation {cfg['activation_function']!r} is not supported "
                             f"(supported: {sorted(ACTIVATIONS)})")
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=hidden,
            intermediate_size=cfg.get("n_inner") or 4 * hidden,
            num_hidden_layers=cfg["n_layer"], num_attention_heads=heads,
            rotary_dim=cfg.get("rotary_dim") or hidden // heads,
            layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            max_position_embeddings=cfg.get("n_positions", 2048),
            activation=cfg.get("activation_function", "gelu_new"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
        )


def fused(cfg: GPTJConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    width = cfg.hidden_size
    return {"attn.qkv_proj": (("attn.q_proj", width), ("attn.k_proj", width), ("attn.v_proj", width))}


LORA_TARGETS = ("attn.qkv_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out")
QKV, OUT, FC_IN, FC_OUT = range(len(LORA_TARGETS))


def rotary_tables(cfg: GPTJConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin, (length, rotary_dim), fp32, each frequency repeated for its pair:
    sin is (-s, s) per pair, so x * cos + swap_pairs(x) * sin is rotate_every_two's rotation."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))  # as transformers computes it
    angles = torch.arange(length, dtype=torch.int64).float()[:, None] * inv_freq     # (length, dim / 2)
    sin = angles.sin()
    return angles.cos().repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); cos/sin: (tokens, 1, rotary_dim). Rotates the first
    rotary_dim dimensions pairwise and passes the rest through."""
    dim = cos.shape[-1]
    rot = x[..., :dim]
    swapped = rot.unflatten(-1, (dim // 2, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    rot = torch.addcmul(rot * cos, swapped, sin)
    return rot if dim == x.shape[-1] else torch.cat([rot, x[..., dim:]], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTJConfig, layer: int):
        super().__init__()
        self.layer, self.heads, self.head_dim = layer, cfg.num_attention_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x, inputs: LayerInputs, lora: LoraBatch | None) -> torch.Tensor:
        """x: (tokens, hidden), the batch's rows one after another; `inputs.cache.shape` is (batch, seq)."""
        qkv = with_lora(lora, self.layer, QKV, x, self.qkv_proj(x)).view(-1, 3 * self.heads, self.head_dim)
        qk = apply_rotary(qkv[:, :2 * self.heads], inputs.cos, inputs.sin)  # in the residual's dtype, as Llama
        # scale 1/sqrt(head_dim), as GPT-J's
        out = attend(inputs.cache, self.layer, qk[:, :self.heads], qk[:, self.heads:], qkv[:, 2 * self.heads:],
                     inputs.mask)
        return with_lora(lora, self.layer, OUT, out, self.out_proj(out))  # (tokens, hidden)


class MLP(nn.Module):
    def __init__(self, cfg: GPTJConfig, layer: int):
        super().__init__()
        self.layer, self.act = layer, ACTIVATIONS[cfg.activation]
        self.fc_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        hidden = self.act(with_lora(lora, self.layer, FC_IN, x, self.fc_in(x)))
        return with_lora(lora, self.layer, FC_OUT, hidden, self.fc_out(hidden))


class Block(nn.Module):
    def __init__(self, cfg: GPTJConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer)

    def forward(self, x, inputs: LayerInputs, lora: LoraBatch | None) -> torch.Tensor:
        h = self.ln_1(x)
        # quantized projections answer in bf16: added to the residual first, so the sum is in its dtype
        return x + self.attn(h, inputs, lora) + self.mlp(h, lora)


class GPTJForCausalLM(CausalLM):
    def __init__(self, cfg: GPTJConfig):
        super().__init__(cfg, [Block(cfg, i) for i in range(cfg.num_hidden_layers)],
                         nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps), head_bias=True)

    def position_tables(self) -> dict[str, torch.Tensor]:
        cos, sin = rotary_tables(self.config, self.config.max_position_embeddings)
        return {"rope_cos": cos, "rope_sin": sin}


FAMILY = Family(
    name="gptj", model_types=("gptj",), config=GPTJConfig.from_hf, model=GPTJForCausalLM,
    renames=(("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
             ("transformer.ln_f.", "model.norm.")),
    hf_layers="transformer.h", fused=fused, lora_targets=LORA_TARGETS,
    peft_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    layer_states=lambda cfg: [FullAttention(cfg.num_key_value_heads, cfg.head_dim)] * cfg.num_hidden_layers,
    ignored=(".attn.bias", ".attn.masked_bias"))  # causal-mask buffers older checkpoints saved
