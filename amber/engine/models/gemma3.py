"""The Gemma 3 family (text models: Gemma 3 270M, 1B and the text towers of the larger ones):
architecture and its declaration.

Its differences from Llama, each as transformers' Gemma3ForCausalLM computes it:
- RMSNorm scales by (1 + w) and runs in fp32 whatever the activations' dtype; four per layer
  (input, post-attention, pre- and post-feedforward), and one more on each head's queries and keys
  (q_norm, k_norm) before RoPE.
- Attention scores are scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5. The final
  logits are soft-capped (tanh) when the config says so; attention scores are not, whatever
  `attn_logit_softcapping` says: transformers' Gemma 3 reads that setting and never applies it
  (Gemma 2 did), and every Gemma 3 config sets it to null.
- Layers are sliding-window ("sliding_attention": a query sees the last `sliding_window`
  positions) or full ("full_attention"), each kind with its own RoPE theta.
- Embeddings are scaled by sqrt(hidden_size), rounded to the weights' dtype; the MLP is GeGLU
  (tanh GELU); the LM head is tied to the embeddings.

Names are Hugging Face's, with q/k/v and gate/up fused as Llama's are (`llama.fused`), so LoRA and
quantization serve it as they serve Llama. There is no fast decode path: decode steps run `forward`.
A checkpoint converted from a GGUF carries no chat template, so the family brings Gemma's own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from amber.engine.kv_cache import BatchCache
from amber.engine.models.family import Family, FullAttention, LayerState, SlidingWindow
from amber.engine.models.layers import (CausalLM, LayerInputs, apply_rope, attend, attention_mask,
                                        inverse_frequencies, rope_cos_sin, with_lora)
from amber.engine.models.llama import LORA_TARGETS, MLP, O_PROJ, PEFT_TARGETS, QKV, fused

if TYPE_CHECKING:
    from amber.engine.lora import LoraBatch

SLIDING, FULL = "sliding_attention", "full_attention"
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_theta: float                  # full-attention layers'
    rope_local_theta: float            # sliding-window layers'
    rope_scaling: float                # linear RoPE scaling of the full-attention layers (1: none)
    max_position_embeddings: int
    attention_bias: bool
    final_logit_softcapping: float | None
    tie_word_embeddings: bool
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> Gemma3Config:
        """Read a Gemma3TextConfig's config.json, in transformers 5's spelling (`rope_parameters`
        per layer type) or 4's (`rope_theta`, `rope_local_base_freq`, `rope_scaling`); layer kinds
        from `layer_types`, else every `sliding_window_pattern`-th layer full. Defaults are
        Gemma3TextConfig's."""
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("Gemma 3 with bidirectional attention (an encoder) is not a causal LM")
        if cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh")) not in GELU_TANH:
            raise ValueError(f"Gemma 3 activation {cfg.get('hidden_activation')!r} is not supported")
        layers, heads = cfg.get("num_hidden_layers", 26), cfg.get("num_attention_heads", 8)
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
        types = tuple(cfg.get("layer_types") or (SLIDING if (i + 1) % pattern else FULL for i in range(layers)))
        if not set(types) <= {SLIDING, FULL}:
            raise ValueError(f"Gemma 3 layer types {sorted(set(types))}: only {SLIDING}, {FULL} are known")
        full, local = _rope(cfg)
        return cls(
            vocab_size=cfg.get("vocab_size", 262_208), hidden_size=cfg.get("hidden_size", 2304),
            intermediate_size=cfg.get("intermediate_size", 9216), num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads", 4),
            head_dim=cfg.get("head_dim") or 256, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
            sliding_window=cfg.get("sliding_window") or 4096, layer_types=types,
            rope_theta=full[0], rope_local_theta=local[0], rope_scaling=full[1],
            max_position_embeddings=cfg.get("max_position_embeddings", 131_072),
            attention_bias=cfg.get("attention_bias", False),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True), bos_token_id=cfg.get("bos_token_id", 2))


def _rope(cfg: dict) -> tuple[tuple[float, float], tuple[float, float]]:
    """(theta, linear scaling factor) of the full-attention and of the sliding-window layers."""
    params = cfg.get("rope_parameters") or {}
    if FULL not in params and SLIDING not in params:  # transformers 4: global settings + local theta
        params = {FULL: {"rope_theta": cfg.get("rope_theta", 1_000_000.0), **(cfg.get("rope_scaling") or {})},
                  SLIDING: {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}}
    found = []
    for kind, theta in ((FULL, 1_000_000.0), (SLIDING, 10_000.0)):
        rope = params.get(kind) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ValueError(f"RoPE type {rope_type!r} is not supported yet")
        found.append((rope.get("rope_theta", theta), rope.get("factor", 1.0) if rope_type == "linear" else 1.0))
    return found[0], found[1]


def layer_states(cfg: Gemma3Config) -> list[LayerState]:
    return [SlidingWindow(cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window) if kind == SLIDING
            else FullAttention(cfg.num_key_value_heads, cfg.head_dim) for kind in cfg.layer_types]


class RMSNorm(nn.Module):
    """Gemma's: x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32, back in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op (a decode step runs 108 of these): the same arithmetic, bit for bit here
        return F.rms_norm(x.float(), self.weight.shape, self.scale(), self.eps).type_as(x)

    def scale(self) -> torch.Tensor:
        """1 + w in fp32, made at first use (after loading)."""
        if getattr(self, "_scale", None) is None or self._scale.device != self.weight.device:
            self._scale = (1.0 + self.weight.float()).detach()
        return self._scale


class Attention(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim,
                                  bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, inputs: LayerInputs, lora: LoraBatch | None) -> torch.Tensor:
        """x: (tokens, hidden), the batch's rows one after another; `inputs.cache.shape` is (batch, seq)."""
        qkv = with_lora(lora, self.layer, QKV, x, self.qkv_proj(x))
        qkv = qkv.view(-1, self.heads + 2 * self.kv_heads, self.head_dim)
        # each head normed, then rotated in the residual stream's dtype (cos's), as Llama's
        q = apply_rope(self.q_norm(qkv[:, :self.heads]), inputs.cos, inputs.sin)
        k = apply_rope(self.k_norm(qkv[:, self.heads:self.heads + self.kv_heads]), inputs.cos, inputs.sin)
        out = attend(inputs.cache, self.layer, q, k, qkv[:, self.heads + self.kv_heads:], inputs.mask, self.scale,
                     inputs.window)
        return with_lora(lora, self.layer, O_PROJ, out, self.o_proj(out))  # (tokens, hidden)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer, act=lambda x: F.gelu(x, approximate="tanh"))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, inputs: LayerInputs, lora: LoraBatch | None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), inputs, lora))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), lora))


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, cfg: Gemma3Config):
        super().__init__(cfg, [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)],
                         RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def position_tables(self) -> dict[str, torch.Tensor]:
        """RoPE frequencies per layer kind; cos and sin are made per pass from them, as transformers
        does (tables over 32k positions of 256-wide heads would cost ~130 MB)."""
        cfg = self.config
        return {"inv_freq": inverse_frequencies(cfg.rope_theta, cfg.head_dim) / cfg.rope_scaling,
                "local_inv_freq": inverse_frequencies(cfg.rope_local_theta, cfg.head_dim)}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        normalizer = torch.tensor(self.config.hidden_size ** 0.5, dtype=self.activation_dtype)
        return self.model.embed_tokens(ids) * normalizer

    def layer_inputs(self, positions: torch.Tensor, cache: BatchCache, dtype: torch.dtype) -> list[LayerInputs]:
        """Full layers see every earlier position, sliding ones the last `sliding_window`; each
        kind rotates with its own theta."""
        cfg, kinds = self.config, {}
        for kind, inv_freq, window in ((FULL, self.inv_freq, None), (SLIDING, self.local_inv_freq, cfg.sliding_window)):
            if kind in cfg.layer_types:
                cos, sin = rope_cos_sin(inv_freq, positions.flatten())
                kinds[kind] = LayerInputs(cache, attention_mask(positions, cache.context, window),
                                          cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype), window or 0)
        return [kinds[kind] for kind in cfg.layer_types]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


# Gemma 3's chat template, as google/gemma-3-*-it ship it in tokenizer_config.json: the assistant's
# role is spelled "model", a system message opens the first user turn, turns end with <end_of_turn>.
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

FAMILY = Family(
    name="gemma3", model_types=("gemma3_text",), config=Gemma3Config.from_hf, model=Gemma3ForCausalLM,
    renames=(), hf_layers="model.layers", fused=fused, lora_targets=LORA_TARGETS,
    peft_targets=PEFT_TARGETS, layer_states=layer_states, chat_template=CHAT_TEMPLATE, end_tokens=("<end_of_turn>",))
