"""Model families, one module each (llama.py, gptj.py, gemma3.py, jamba.py), found by config.json's
`model_type`.

A family module holds its architecture and a `FAMILY` (family.py) declaring its config, weight
names and fusions, LoRA targets, quantization and each layer's state. Nothing outside this package
names a family: the loader asks `family_for(model_type)`, LoRA and training `family_of(model)`.
"""
from __future__ import annotations

from torch import nn

from amber.engine.models import gemma3, gptj, jamba, llama
from amber.engine.models.family import Family, FullAttention, LayerState, Recurrent, SlidingWindow

__all__ = ["FAMILIES", "Family", "FullAttention", "LayerState", "Recurrent", "SlidingWindow", "family_for",
           "family_of", "supported_types"]

FAMILIES: dict[str, Family] = {t: f.FAMILY for f in (llama, gptj, gemma3, jamba) for t in f.FAMILY.model_types}


def supported_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_type: str | None) -> Family:
    """The family that reads checkpoints of `model_type`; ValueError naming the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {supported_types()})")
    return FAMILIES[model_type]


def family_of(model: nn.Module) -> Family:
    """The family a built model belongs to."""
    for family in FAMILIES.values():
        if type(model) is family.model:
            return family
    raise TypeError(f"{type(model).__name__} is not a model family's model")
