"""What a model family declares, so that the loader, the KV cache, LoRA and quantization serve it
without naming it; and the state each layer keeps between steps.

Every family's model is laid out the same way at the top (`model.embed_tokens`, `model.layers[i]`,
`model.norm`, `lm_head`) with Hugging Face's names inside each layer, and answers the same calls:
`forward(input_ids, positions, cache, slots, lora)` -> hidden states after the final norm, and
`logits(hidden)`; layers.CausalLM holds that shared top level. A family may add a fast decode path
(`forward_one`, `forward_rows`: llama.py); the runner uses it when the model has one and the
family's forward otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from torch import nn


@dataclass(frozen=True)
class FullAttention:
    """A layer that keeps the keys and values of every past position (kv_cache.KVCache)."""
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class SlidingWindow:
    """A layer whose queries see only the last `window` positions (Gemma 3's local layers). Its
    keys and values are kept like FullAttention's for now (kv_cache.KVCache.for_layers says why)."""
    kv_heads: int
    head_dim: int
    window: int


@dataclass(frozen=True)
class Recurrent:
    """A layer that keeps a fixed-size state per sequence instead of past positions (Jamba's Mamba
    mixers): the last inputs of its causal convolution and the state of its selective scan."""
    conv_shape: tuple[int, ...]   # (channels, kernel - 1)
    ssm_shape: tuple[int, ...]    # (channels, state size)


# What a layer keeps between steps, each kind owned by kv_cache.py; None: a layer that keeps nothing.
LayerState = Union[FullAttention, SlidingWindow, Recurrent, None]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]            # config.json's model_type values this family reads
    config: Callable[[dict], Any]           # config.json -> the family's frozen config
    model: type[nn.Module]                  # built from that config (on the meta device by the loader)
    # Hugging Face parameter prefixes -> the shared top-level layout (embed_tokens, layers, norm)
    renames: tuple[tuple[str, str], ...]
    hf_layers: str                          # HF prefix of layer i's parameters ("model.layers"): PEFT names
    # per layer: fused module -> its HF parts in stacking order, with each part's output width
    fused: Callable[[Any], dict[str, tuple[tuple[str, int], ...]]]
    lora_targets: tuple[str, ...]           # the (fused) modules adapters add to, in a fixed order
    peft_targets: tuple[str, ...]           # the same modules as PEFT's target_modules (HF names)
    layer_states: Callable[[Any], list[LayerState]]
    ignored: tuple[str, ...] = ()           # HF tensor name endings that are not parameters (old buffers)
    # every nn.Linear is quantized (lm_head with the head's groups) except module names ending so
    unquantized: tuple[str, ...] = ()
    # the chat template to use when a checkpoint carries none (a GGUF conversion may not)
    chat_template: str | None = None
    # tokens that end the model's turn besides the checkpoint's EOS ids: generation stops at them
    end_tokens: tuple[str, ...] = ()

    def part_sizes(self, cfg: Any, target: str, out_features: int) -> list[int]:
        """Output widths of the HF modules that make up `target` (one, unless it is fused)."""
        parts = self.fused(cfg).get(target)
        return [size for _, size in parts] if parts else [out_features]

    def hf_parts(self, cfg: Any, target: str) -> tuple[str, ...]:
        parts = self.fused(cfg).get(target)
        return tuple(name for name, _ in parts) if parts else (target,)
