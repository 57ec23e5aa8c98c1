"""Checkpoint directory -> a ready model on its device, in the precision the registry asks for.

Reads behaviour from config.json (`architectures` / `model_type`), never from file names.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from amber.engine.model import LlamaConfig, LlamaForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LLAMA_TYPES = {"llama", "mistral", "smollm2"}


def read_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


def load_model(checkpoint: Path, dtype: str = "float32", device: str = "cpu") -> LlamaForCausalLM:
    hf = read_config(checkpoint)
    if hf.get("model_type") not in LLAMA_TYPES:
        raise ValueError(f"{checkpoint}: model_type {hf.get('model_type')!r} is not supported "
                         f"(supported: {sorted(LLAMA_TYPES)})")
    cfg = LlamaConfig.from_hf(hf)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    state = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(shard))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: weights do not match the architecture "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers were created on the meta device; rebuild them for real.
    from amber.engine.model import rope_tables
    model.rope_cos, model.rope_sin = rope_tables(cfg, cfg.max_position_embeddings)
    return model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
