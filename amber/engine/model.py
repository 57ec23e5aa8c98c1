"""Compatibility only: the Llama family moved to models/llama.py. engine.py still imports its
model type from here; remove this module once it annotates with any family's model (nn.Module)."""
from amber.engine.models.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
