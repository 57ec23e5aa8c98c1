"""Checkpoint directory -> a ready model on its device, in the precision the registry asks for.

Reads behaviour from config.json (`model_type`, which picks the family: models/), never from file
names. Hugging Face parameter names are mapped onto the family's layout here (its `renames` and
`fused` projections); the loader itself names no family.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from amber.engine import kernels
from amber.engine.models import Family, family_for
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


def read_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


def hf_to_model_names(family: Family, cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF checkpoint names -> the family's: drop non-parameters, rename prefixes, and stack each
    layer's fused parts (weights, and biases where the parts have them)."""
    renamed = {}
    for name, tensor in state.items():
        if name.endswith(family.ignored):
            continue
        for hf, ours in family.renames:
            if name.startswith(hf):
                name = ours + name[len(hf):]
                break
        renamed[name] = tensor
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for fused, parts in family.fused(cfg).items():
            for kind in ("weight", "bias"):
                names = [f"{prefix}{part}.{kind}" for part, _ in parts]
                if kind == "bias" and not any(n in renamed for n in names):
                    continue
                renamed[f"{prefix}{fused}.{kind}"] = torch.cat([renamed.pop(n) for n in names])
    return renamed


def load_model(checkpoint: Path, dtype: str = "float32", device: str = "cpu", *, tune: bool = True,
               kernel_cache: Path | None = None) -> nn.Module:
    """`tune`: on CPU, choose each quantized layer's kernels by measuring them (kernels.py), with
    the timings kept in `kernel_cache` (AMBER_HOME/kernels) or, without one, for this process."""
    hf = read_config(checkpoint)
    try:
        family = family_for(hf.get("model_type"))
    except ValueError as exc:
        raise ValueError(f"{checkpoint}: {exc}") from None
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(ACTIVATION_DTYPES)}")
    cfg = family.config(hf)
    with torch.device("meta"):
        model = family.model(cfg)
    state = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(shard))
    mapped = {tensor.untyped_storage().data_ptr() for tensor in state.values()}  # the file's memory
    tied = getattr(cfg, "tie_word_embeddings", False)
    if tied:
        state.pop("lm_head.weight", None)
    try:
        state = hf_to_model_names(family, cfg, state)
    except KeyError as exc:
        raise ValueError(f"{checkpoint}: missing weight {exc}") from exc
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: weights do not match the architecture "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers()  # its tables (RoPE), which were made on meta
    model = model.to(device=device, dtype=ACTIVATION_DTYPES[dtype]).eval().requires_grad_(False)
    for module in model.modules():  # the tables are read in fp32 whatever the weights' dtype
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.float())
    if dtype in WEIGHT_BITS:
        # quantized straight from the file's mapping, before _own: what is copied then is only what
        # quantization leaves in the file (norms, kept layers), not the whole fp32 model first
        # (SmolLM2-135M in int4: peak RSS while loading 1,891 -> 1,285 MB, 418 MB after either way)
        quantize(model, WEIGHT_BITS[dtype], HEAD_GROUPS[dtype], keep=family.unquantized)
        model.kv_dtype = torch.bfloat16
    with torch.no_grad():  # own memory, not views of the file: see _own
        _own(model, mapped)
    if dtype in WEIGHT_BITS and tune and torch.device(device).type == "cpu":
        kernels.tune(model, kernel_cache)
    _give_back_freed_memory()
    return model


def _own(model: nn.Module, mapped: set[int]) -> None:
    """Give every parameter and buffer that still lies in the file (its storage one of `mapped`)
    its own memory. safetensors' load_file returns views of a private mapping of the whole file,
    which stays resident while any one of them lives: with the fp32 embedding kept beside quantized
    layers, that held all 540 MB of SmolLM2's checkpoint in the server's RSS. Copying what the model
    keeps lets the mapping go when loading ends; what a cast, a fusion or quantization already made
    is its own and is not copied again."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.untyped_storage().data_ptr() in mapped:
                param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.untyped_storage().data_ptr() in mapped:
                setattr(module, name, buffer.clone())


def _give_back_freed_memory() -> None:
    """Return the heap loading freed (the fp32 layers quantization replaced, kernel tuning's
    buffers) to the OS: glibc keeps freed memory mapped for reuse, so it would stay in the
    server's RSS. malloc_trim exists in glibc only; elsewhere this does nothing."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
