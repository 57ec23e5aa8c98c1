"""Checkpoint directory -> a ready model on its device, in the precision the registry asks for.

Reads behaviour from config.json (`model_type`), never from file names. Hugging Face parameter
names are mapped onto the model's fused projections here (`model.FUSED`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from amber.engine import kernels
from amber.engine.model import FUSED, LlamaConfig, LlamaForCausalLM, rope_tables
from amber.engine.quantize import quantize

# int8 and int4 modes are weight-only: low-bit matrices, activations in higher precision (the idea
# behind Jamba's ExpertsInt8). "int8" and "int4" keep the residual stream in fp32 with attention
# and the KV cache in bf16 (fp32 attention made its prefill 2x slower, and the cache twice the
# size); "int8-bf16" runs all activations in bf16. quantize.py says why int4 is exact for Q4 GGUFs.
ACTIVATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                     "int8": torch.float32, "int8-bf16": torch.bfloat16, "int4": torch.float32}
WEIGHT_BITS = {"int8": 8, "int8-bf16": 8, "int4": 4}
# scale groups of the int8 LM head (quantize.py): the fewest that keep the mode under 0.05 nats
HEAD_GROUPS = {"int8": 4, "int8-bf16": 4, "int4": 1}
LLAMA_TYPES = {"llama", "mistral"}


def read_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


def fuse_hf_names(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Replace each layer's q/k/v and gate/up weights by their stacked, fused parameter."""
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            state[f"{prefix}{fused}.weight"] = torch.cat([state.pop(f"{prefix}{p}.weight") for p in parts])
    return state


def load_model(checkpoint: Path, dtype: str = "float32", device: str = "cpu", *, tune: bool = True,
               kernel_cache: Path | None = None) -> LlamaForCausalLM:
    """`tune`: on CPU, choose each quantized layer's kernels by measuring them (kernels.py), with
    the timings kept in `kernel_cache` (AMBER_HOME/kernels) or, without one, for this process."""
    hf = read_config(checkpoint)
    if hf.get("model_type") not in LLAMA_TYPES:
        raise ValueError(f"{checkpoint}: model_type {hf.get('model_type')!r} is not supported "
                         f"(supported: {sorted(LLAMA_TYPES)})")
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(ACTIVATION_DTYPES)}")
    cfg = LlamaConfig.from_hf(hf)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    state = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(shard))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    try:
        state = fuse_hf_names(state, cfg.num_hidden_layers)
    except KeyError as exc:
        raise ValueError(f"{checkpoint}: missing weight {exc}") from exc
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: weights do not match the architecture "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_tables(cfg, cfg.max_position_embeddings)  # were on meta
    model = model.to(device=device, dtype=ACTIVATION_DTYPES[dtype]).eval().requires_grad_(False)
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    if dtype in WEIGHT_BITS:
        quantize(model, WEIGHT_BITS[dtype], HEAD_GROUPS[dtype])
        model.kv_dtype = torch.bfloat16
        if tune and torch.device(device).type == "cpu":
            kernels.tune(model, kernel_cache)
    return model
