"""The Jamba family (AI21's JambaForCausalLM): attention, Mamba and mixture-of-experts layers in one
stack. Architecture and its declaration; the math is transformers' torch path (modeling_jamba.py,
without the mamba_ssm / causal_conv1d kernels), op for op where the order changes the rounding.

Layer i mixes tokens by attention when i % attn_layer_period == attn_layer_offset, else by a Mamba
mixer; its feed-forward is a sparse MoE when i % expert_layer_period == expert_layer_offset, else a
dense SwiGLU MLP. Attention has no positional encoding (the Mamba layers carry order). A Mamba mixer
keeps a recurrent state per sequence instead of keys and values (family.Recurrent, held by the
cache owner in kv_cache.py): the last `d_conv - 1` inputs of its causal depthwise convolution and
the (channels, d_state) state of its selective scan, carried from chunk to chunk and step to step.

The router is softmax then top-k, the chosen weights *not* renormalised (transformers'
JambaTopKRouter), and stays unquantized. Each expert is its own gate/up/down nn.Linear, under the
checkpoint's names (`feed_forward.experts.{e}.gate_proj`): quantize.py turns each into an int8 (or
int4) layer, so every expert's matmul runs on its own low-bit weights (ExpertsInt8's idea).
Parameter names are Hugging Face's, except model.final_layernorm -> model.norm. There is no fast
decode path: decode steps run `forward` (the runner falls back).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from amber.engine.kv_cache import BatchCache
from amber.engine.models.family import Family, FullAttention, Recurrent
from amber.engine.models.layers import CausalLM, LayerInputs, attend, attention_mask, with_lora
from amber.engine.models.llama import RMSNorm

if TYPE_CHECKING:
    from amber.engine.lora import LoraBatch


@dataclass(frozen=True)
class JambaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attn_layer_period: int
    attn_layer_offset: int
    expert_layer_period: int
    expert_layer_offset: int
    num_experts: int
    num_experts_per_tok: int
    mamba_d_state: int
    mamba_d_conv: int
    mamba_expand: int
    mamba_dt_rank: int
    mamba_conv_bias: bool
    mamba_proj_bias: bool
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> JambaConfig:
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Jamba activation {cfg['hidden_act']!r} is not supported (supported: ['silu'])")
        hidden, heads = cfg.get("hidden_size", 4096), cfg.get("num_attention_heads", 32)
        rank = cfg.get("mamba_dt_rank", "auto")
        return cls(
            vocab_size=cfg.get("vocab_size", 65536), hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size", 14336),
            num_hidden_layers=cfg.get("num_hidden_layers", 32), num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 262144),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attn_layer_period=cfg.get("attn_layer_period", 8), attn_layer_offset=cfg.get("attn_layer_offset", 4),
            expert_layer_period=cfg.get("expert_layer_period", 2),
            expert_layer_offset=cfg.get("expert_layer_offset", 1),
            num_experts=cfg.get("num_experts", 16), num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
            mamba_d_state=cfg.get("mamba_d_state", 16), mamba_d_conv=cfg.get("mamba_d_conv", 4),
            mamba_expand=cfg.get("mamba_expand", 2),
            mamba_dt_rank=-(-hidden // 16) if rank == "auto" else rank,  # ceil, as transformers computes it
            mamba_conv_bias=cfg.get("mamba_conv_bias", True), mamba_proj_bias=cfg.get("mamba_proj_bias", False),
            bos_token_id=cfg.get("bos_token_id"),
        )

    def is_attention(self, layer: int) -> bool:
        return layer % self.attn_layer_period == self.attn_layer_offset

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 1 and layer % self.expert_layer_period == self.expert_layer_offset

    @property
    def mamba_channels(self) -> int:
        return self.mamba_expand * self.hidden_size


def layer_states(cfg: JambaConfig) -> list[FullAttention | Recurrent]:
    channels = cfg.mamba_channels
    mamba = Recurrent((channels, cfg.mamba_d_conv - 1), (channels, cfg.mamba_d_state))
    return [FullAttention(cfg.num_key_value_heads, cfg.head_dim) if cfg.is_attention(i) else mamba
            for i in range(cfg.num_hidden_layers)]


# the projections a LoRA adapter can add to (lora.py), in a fixed order: the index names one. Each
# exists in some layers only (attention or Mamba, dense MLP or experts); experts take no adapter,
# as PEFT cannot address transformers' fused 3-D expert weights by target_modules.
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mamba.in_proj", "mamba.out_proj",
                "feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj")
Q, K, V, O, IN, OUT, GATE, UP, DOWN = range(len(LORA_TARGETS))


class Attention(nn.Module):
    def __init__(self, cfg: JambaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: BatchCache, mask, lora: LoraBatch | None) -> torch.Tensor:
        """x: (tokens, hidden), the batch's rows one after another; `cache.shape` is (batch, seq)."""
        q, k, v = (with_lora(lora, self.layer, t, x, proj(x)).view(-1, heads, self.head_dim)
                   for t, proj, heads in ((Q, self.q_proj, self.heads), (K, self.k_proj, self.kv_heads),
                                          (V, self.v_proj, self.kv_heads)))
        out = attend(cache, self.layer, q, k, v, mask)
        return with_lora(lora, self.layer, O, out, self.o_proj(out))  # (tokens, hidden)


class Mamba(nn.Module):
    """The selective state-space mixer, continuing each row from its cached state."""

    def __init__(self, cfg: JambaConfig, layer: int):
        super().__init__()
        self.layer, channels = layer, cfg.mamba_channels
        self.rank, self.state_size = cfg.mamba_dt_rank, cfg.mamba_d_state
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * channels, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(channels, channels, cfg.mamba_d_conv, groups=channels, bias=cfg.mamba_conv_bias,
                                padding=cfg.mamba_d_conv - 1)
        self.x_proj = nn.Linear(channels, self.rank + 2 * self.state_size, bias=False)
        self.dt_proj = nn.Linear(self.rank, channels, bias=True)
        self.A_log = nn.Parameter(torch.empty(channels, self.state_size))
        self.D = nn.Parameter(torch.empty(channels))
        self.out_proj = nn.Linear(channels, cfg.hidden_size, bias=cfg.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.b_layernorm = RMSNorm(self.state_size, cfg.rms_norm_eps)
        self.c_layernorm = RMSNorm(self.state_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cache: BatchCache, lora: LoraBatch | None) -> torch.Tensor:
        """x: (tokens, hidden); each row's tokens follow on from the state in its slot."""
        batch, seq = cache.shape
        conv_state, ssm_state = cache.read_state(self.layer)  # (batch, channels, d_conv - 1), (batch, channels, N)
        xz = with_lora(lora, self.layer, IN, x, self.in_proj(x)).view(batch, seq, -1).transpose(1, 2)
        h, z = xz.chunk(2, dim=1)                                          # (batch, channels, seq) each
        h, conv_state = self.convolve(h, conv_state)
        dbc = self.x_proj(h.transpose(1, 2).contiguous())                 # (batch, seq, rank + 2N)
        dt, B, C = dbc.split([self.rank, self.state_size, self.state_size], dim=-1)
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        # dt_proj's bias is added after its product, in dt's dtype, as transformers does (it stays unquantized)
        dt = F.softplus(self.dt_proj.weight @ dt.transpose(1, 2) + self.dt_proj.bias[:, None])  # (batch, channels, seq)
        y, ssm_state = self.scan(h, dt, B, C, ssm_state)
        cache.write_state(self.layer, conv_state, ssm_state)
        y = (y + h * self.D.float()[None, :, None]) * F.silu(z)           # D skip, then the gate
        y = y.transpose(1, 2).reshape(batch * seq, -1).to(x.dtype).contiguous()  # int8 kernels take rows
        return with_lora(lora, self.layer, OUT, y, self.out_proj(y))     # (tokens, hidden)

    def convolve(self, h: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv1d + SiLU over h (batch, channels, seq), after the `d_conv - 1`
        inputs before it (`state`; zeros at a sequence's start, as transformers' left padding);
        returns the output in the conv weights' dtype and the new state."""
        weight = self.conv1d.weight
        window = torch.cat([state.to(weight.dtype), h.to(weight.dtype)], dim=-1)  # (batch, channels, d_conv - 1 + seq)
        out = F.conv1d(window, weight, self.conv1d.bias, groups=weight.shape[0])
        return F.silu(out), window[:, :, window.shape[-1] - state.shape[-1]:].float()

    def scan(self, h: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, state: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The selective scan, one position at a time (transformers' recurrent loop, its discretisation
        computed per position, which is the same arithmetic in bounded memory): h, dt (batch,
        channels, seq); B, C (batch, seq, N); state (batch, channels, N) fp32. Returns the outputs
        (batch, channels, seq) before the D skip and the state after the last position."""
        A = -torch.exp(self.A_log.float())                                  # (channels, N)
        outputs = []
        for t in range(h.shape[-1]):
            step = dt[:, :, t, None]                                        # (batch, channels, 1)
            state = torch.exp(A * step) * state + (step * B[:, None, t].float()) * h[:, :, t, None].float()
            outputs.append(torch.matmul(state.to(h.dtype), C[:, t, :, None])[:, :, 0])
        return torch.stack(outputs, dim=-1), state


class MLP(nn.Module):
    """SwiGLU feed-forward: a dense layer's (with LoRA) or one expert's (without)."""

    def __init__(self, cfg: JambaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        gate = with_lora(lora, self.layer, GATE, x, self.gate_proj(x))
        hidden = F.silu(gate) * with_lora(lora, self.layer, UP, x, self.up_proj(x))
        return with_lora(lora, self.layer, DOWN, hidden, self.down_proj(hidden))


class SparseMoe(nn.Module):
    def __init__(self, cfg: JambaConfig, layer: int):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg, layer) for _ in range(cfg.num_experts))

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """x (tokens, hidden): each token through its top-k experts, summed with the router's
        softmax weights (not renormalised); experts in index order, as transformers adds them."""
        weights = F.softmax(self.router(x), dim=-1, dtype=torch.float)
        top_weights, top_experts = torch.topk(weights, self.top_k, dim=-1)  # (tokens, k)
        top_weights = top_weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in top_experts.unique().tolist():
            tokens, rank = torch.where(top_experts == e)
            y = self.experts[e](x[tokens], None) * top_weights[tokens, rank, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: JambaConfig, layer: int):
        super().__init__()
        self.attention = cfg.is_attention(layer)
        if self.attention:
            self.self_attn = Attention(cfg, layer)
        else:
            self.mamba = Mamba(cfg, layer)
        self.feed_forward = SparseMoe(cfg, layer) if cfg.is_moe(layer) else MLP(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, inputs: LayerInputs, lora: LoraBatch | None) -> torch.Tensor:
        h = self.input_layernorm(x)
        mixed = (self.self_attn(h, inputs.cache, inputs.mask, lora) if self.attention
                 else self.mamba(h, inputs.cache, lora))
        x = x + mixed
        return x + self.feed_forward(self.pre_ff_layernorm(x), lora)


class JambaForCausalLM(CausalLM):
    """Every token of a row is real: a Mamba state would run on through padding (runner.py prefills
    rows of a recurrent family one at a time), and a row that starts at position 0 starts from a
    zero state. No position tables: attention here has no RoPE."""

    def __init__(self, cfg: JambaConfig):
        super().__init__(cfg, [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)],
                         RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def layer_inputs(self, positions: torch.Tensor, cache: BatchCache, dtype: torch.dtype) -> list[LayerInputs]:
        inputs = LayerInputs(cache, attention_mask(positions, cache.context), None, None)
        return [inputs] * len(self.model.layers)


FAMILY = Family(
    name="jamba", model_types=("jamba",), config=JambaConfig.from_hf, model=JambaForCausalLM,
    renames=(("model.final_layernorm.", "model.norm."),), hf_layers="model.layers", fused=lambda cfg: {},
    lora_targets=LORA_TARGETS,
    peft_targets=("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj", "down_proj"),
    layer_states=layer_states,
    # the router picks experts (a flipped choice costs far more than rounding); dt_proj is tiny
    # and feeds exp(A dt), and transformers adds its bias after the product
    unquantized=("feed_forward.router", "mamba.dt_proj"))
