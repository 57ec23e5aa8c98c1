"""Shared fixtures. The real default model is converted once into a cache that outlives the run
(`.amber-test/` in the repo, ignored by git), so only the first run on a machine pays for it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from amber.config import DEFAULT_MODEL, DEFAULT_REGISTRY, SECOND_MODEL, parse_registry
from amber.engine.checkpoint import ensure_checkpoint

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.support_matrix"]
TEST_CACHE = REPO / ".amber-test"
# Every `amber` process the tests start, whatever its AMBER_HOME, measures this machine's kernels
# once (engine/kernels.py) and shares the result, as servers on one machine would.
os.environ.setdefault("AMBER_KERNELS", str(TEST_CACHE / "kernels"))


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """Checkpoint directory of the real default model (SmolLM2-135M-Instruct, fp32)."""
    return ensure_checkpoint(parse_registry(DEFAULT_REGISTRY).models[DEFAULT_MODEL], TEST_CACHE / "checkpoints")


@pytest.fixture(scope="session")
def gemma_checkpoint() -> Path:
    """Checkpoint directory of the second general model (Gemma 3 270M, fp32), converted from the GGUF
    its chunk packages assemble (about a minute, once per machine)."""
    return ensure_checkpoint(parse_registry(DEFAULT_REGISTRY).models[SECOND_MODEL], TEST_CACHE / "checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(default_checkpoint: Path, tmp_path_factory) -> Path:
    """A seeded, random 2-layer Llama with the real tokenizer: fast, and still a real model."""
    import torch
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
    conversion): what every family's tiny checkpoint is (tests/engine/conftest.py has the others)."""
    import shutil

    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_checkpoint / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def sp_tok():
    """A toy SentencePiece-style vocabulary (▁ for spaces, <0xNN> byte fallback, dummy prefix)."""
    import tokenizers
    from tokenizers import decoders, models, normalizers

    from amber.engine.tokenizer import Tokenizer

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    vocab += [("▁", -2.0), ("▁Paris", -1.0), ("▁is", -1.0), ("\n", -1.0), ("a", -3.0), ("▁a", -2.5),
              ("<|newline|>", -5.0)]  # literal text that clashes with AI21's spelling of "\n"
    backend = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<s>", "</s>", "###")])
    return Tokenizer(backend, bos_id=1, eos_ids=frozenset({2}))
