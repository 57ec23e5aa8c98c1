"""Tiny random checkpoints of every model family, built on the fly with transformers' own classes and
saved beside the real default model's tokenizer: Llama (`tiny_checkpoint`), GPT-J, Gemma 3 and
Jamba. Session fixtures, shared by every test directory (tests/conftest.py loads this module)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_checkpoint(default_checkpoint: Path, tmp_path_factory) -> Path:
    """A seeded, random 2-layer Llama with the real tokenizer: fast, and still a real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper than the default init, so greedy choices are well separated
        model.lm_head.weight.mul_(40)
    return save_tiny(model, tmp_path_factory.mktemp("tiny"), default_checkpoint)


def save_tiny(model, directory: Path, default_checkpoint: Path) -> Path:
    """Save a tiny random `model` with the real tokenizer's files, and no chat template (as a GGUF
    conversion leaves)."""
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_checkpoint / name, directory / name)
    return directory


# Stands in for Gemma's <end_of_turn> in the tiny Gemma's tokenizer (SmolLM2's has none): an added
# special token the model never needs, renamed.
END_OF_TURN_ID = 3


@pytest.fixture(scope="session")
def gptj_checkpoint(default_checkpoint, tmp_path_factory):
    """A seeded, random 2-layer GPT-J with partial rotary (8 of 16 dims), random biases everywhere
    (so dropping one shows), and the real tokenizer."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    cfg = GPTJConfig(vocab_size=49152, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512,
                     bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = GPTJForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
        model.lm_head.weight.mul_(40)  # sharper than the default init: greedy choices well separated
    return save_tiny(model, tmp_path_factory.mktemp("tiny-gptj"), default_checkpoint)


GEMMA3_LAYERS = ("sliding_attention", "full_attention", "sliding_attention", "sliding_attention")


@pytest.fixture(scope="session")
def gemma3_checkpoint(default_checkpoint, tmp_path_factory):
    """A seeded, random 4-layer Gemma 3: sliding-window (8 positions) and full layers, scores
    scaled by query_pre_attn_scalar 24 (not head_dim 16), random norm weights (so 1 + w matters),
    GQA, a tied head, and the real tokenizer with one token renamed <end_of_turn>."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                           sliding_window=8, layer_types=list(GEMMA3_LAYERS), max_position_embeddings=512,
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                           bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
        model.model.norm.weight.add_(40)  # the head is tied: sharpen the logits through the final norm
    directory = save_tiny(model, tmp_path_factory.mktemp("tiny-gemma3"), default_checkpoint)
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    (token,) = [t for t in tokenizer["added_tokens"] if t["id"] == END_OF_TURN_ID]
    tokenizer["model"]["vocab"]["<end_of_turn>"] = tokenizer["model"]["vocab"].pop(token["content"])
    token["content"] = "<end_of_turn>"
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    return directory


@pytest.fixture(scope="session")
def jamba_checkpoint(default_checkpoint, tmp_path_factory):
    """A seeded, random 4-layer Jamba: Mamba + dense MLP in layers 0 and 2, attention + 4 experts
    (top 2) in 1 and 3; random D, dt and conv biases (so dropping one shows), and the real tokenizer."""
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(0)
    cfg = JambaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                      expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                      mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = JambaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mamba.D", "conv1d.bias", "dt_proj.bias")):
                p.normal_(0, 0.5)
        model.lm_head.weight.mul_(40)  # sharper than the default init: greedy choices well separated
    return save_tiny(model, tmp_path_factory.mktemp("tiny-jamba"), default_checkpoint)
