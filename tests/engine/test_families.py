"""Model families through one engine: a tiny random GPT-J (built with transformers' GPTJConfig on
the fly) against transformers' own forward, the batched engine against one request at a time,
every precision, and LoRA adapters trained by amber.training and served per row."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from amber.engine.engine import Engine
from amber.engine.kv_cache import KVCache
from amber.engine.loader import load_model
from amber.engine.models import FullAttention, family_for, family_of
from amber.engine.quantize import Int4Linear, Int8Linear, QuantizedLinear
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import AdapterRef, GenerationRequest, SamplingParams
from amber.training.lora import TrainConfig, target_modules, train_lora
from tests.engine.test_engine import BOS, reference_greedy, run
from tests.engine.test_lora import make_adapter, peft_reference
from tests.training.test_lora import TRAIN

TEXT = "GPT-J runs attention and its MLP side by side, rotating only part of each head."
PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog. " * 2, "1 2 3", "A"]


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
    directory = tmp_path_factory.mktemp("tiny-gptj")
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_checkpoint / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def reference(gptj_checkpoint):
    return AutoModelForCausalLM.from_pretrained(gptj_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(gptj_checkpoint):
    return Tokenizer.from_pretrained(gptj_checkpoint)


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) log-probabilities of one forward over `ids`, in a fresh cache."""
    cfg = model.config
    cache = KVCache.for_layers(family_of(model).layer_states(cfg), 1, len(ids),
                               model.kv_dtype or model.model.embed_tokens.weight.dtype)
    hidden = model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), cache, slice(0, 1))
    return model.logits(hidden[0]).log_softmax(-1)


def test_the_registry_dispatches_on_model_type(gptj_checkpoint, tiny_checkpoint, tmp_path):
    gptj, llama = load_model(gptj_checkpoint), load_model(tiny_checkpoint)
    assert family_of(gptj) is family_for("gptj") and family_of(llama) is family_for("llama")
    assert family_for("gptj").layer_states(gptj.config) == [FullAttention(4, 16)] * 2
    assert not hasattr(gptj, "forward_rows") and hasattr(llama, "forward_rows")  # fast decode: Llama only
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        load_model(tmp_path)


def test_gptj_logprobs_equal_transformers_forward(gptj_checkpoint, reference, tokenizer):
    ids = [BOS, *tokenizer.encode(TEXT)]
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    ours = prompt_logprobs(load_model(gptj_checkpoint), ids)
    assert (ours - expected).abs().max() < 1e-4


# mean |logprob - fp32| measured: bf16 0.039, int8 0.023, int8-bf16 0.047, int4 0.126 (random weights are
# not on a 4-bit grid, unlike SmolLM2's Q4 GGUF, and this model's logits are scaled x40); limits about twice that
@pytest.mark.parametrize("mode, tolerance", [("bfloat16", 0.08), ("int8", 0.05), ("int8-bf16", 0.1), ("int4", 0.25)])
def test_gptj_precisions_keep_biases_and_stay_close(gptj_checkpoint, tokenizer, mode, tolerance):
    ids = [BOS, *tokenizer.encode(TEXT)]
    exact = load_model(gptj_checkpoint)
    model = load_model(gptj_checkpoint, mode)
    if mode != "bfloat16":
        mlp, head = model.model.layers[0].mlp, model.lm_head
        assert isinstance(mlp.fc_in, Int4Linear if mode == "int4" else Int8Linear)
        assert isinstance(head, Int8Linear)
        for ours, theirs in [(mlp.fc_in, exact.model.layers[0].mlp.fc_in), (mlp.fc_out, exact.model.layers[0].mlp.fc_out),
                             (head, exact.lm_head)]:
            torch.testing.assert_close(ours.bias.float(), theirs.bias.to(ours.bias.dtype).float())
        with_bias = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.bias is not None}
        assert with_bias == {f"model.layers.{i}.mlp.{fc}" for i in range(2) for fc in ("fc_in", "fc_out")} | {"lm_head"}
    picked = torch.tensor(ids[1:]).unsqueeze(1)
    drift = (prompt_logprobs(model, ids)[:-1].gather(1, picked) - prompt_logprobs(exact, ids)[:-1].gather(1, picked))
    assert drift.abs().mean() < tolerance, f"{mode}: mean |logprob - fp32| {drift.abs().mean():.4f}"


@pytest.mark.parametrize("mode", ["float32", "int8"])
def test_gptj_batched_engine_equals_one_request_at_a_time(gptj_checkpoint, reference, tokenizer, mode):
    engine = Engine(load_model(gptj_checkpoint, mode), tokenizer, max_batch=8, max_context=128,
                    prefill_chunk=5).start()
    try:
        requests = [GenerationRequest(f"r{i}", tuple(tokenizer.encode(p)),
                                      SamplingParams(temperature=0, max_tokens=6 + 2 * i, num_results=2))
                    for i, p in enumerate(PROMPTS)]
        together = run(engine, requests)
        alone = [run(engine, [r])[0] for r in requests]
    finally:
        engine.stop()
    tolerance = 1e-4 if mode == "float32" else 0.3  # int8: the fused kernel and the dense copy differ by bf16 noise
    for request, batched, single in zip(requests, together, alone):
        want = [(t.token_id, t.logprob) for t in single.completions[0].tokens]
        for completion in batched.completions:
            assert len(completion.tokens) == request.params.max_tokens
            for t, (token, logprob) in zip(completion.tokens, want):
                assert t.logprob == pytest.approx(logprob, abs=tolerance)
                if t.token_id != token:  # only a near-tie may flip under rounding; then paths part
                    assert mode != "float32", "fp32 must follow one request at a time exactly"
                    break
        if mode == "float32":  # and both equal the slow loop of transformers' own model
            expected = reference_greedy(reference, list(request.prompt_ids), request.params.max_tokens)
            assert [t for t, _ in want] == [e[0] for e in expected]
            assert [t.raw_logprob for t in single.completions[0].tokens] == pytest.approx([e[1] for e in expected], abs=1e-4)


def test_gptj_adapters_equal_peft_and_mix_with_base_rows(gptj_checkpoint, tokenizer, tmp_path):
    adapter = make_adapter(gptj_checkpoint, tmp_path / "a", 1, 8, list(family_for("gptj").peft_targets))
    partial = make_adapter(gptj_checkpoint, tmp_path / "b", 2, 4, ["q_proj", "v_proj", "fc_out"])
    engine = Engine(load_model(gptj_checkpoint), tokenizer, max_batch=8, max_context=128, prefill_chunk=7).start()
    prompt = tokenizer.encode("Adapters on GPT-J")
    try:
        requests = [GenerationRequest(f"m{i}", tuple(prompt), SamplingParams(temperature=0, max_tokens=8), adapter=a)
                    for i, a in enumerate([adapter, None, partial])]
        mixed = run(engine, requests)
        alone = [run(engine, [r])[0] for r in requests]
    finally:
        engine.stop()
    for request, together, single in zip(requests, mixed, alone):
        assert [t.token_id for t in together.completions[0].tokens] == [t.token_id for t in single.completions[0].tokens]
        if request.adapter is not None:
            expected = reference_greedy(peft_reference(gptj_checkpoint, request.adapter), prompt, 8)
            assert [t.token_id for t in single.completions[0].tokens] == [e[0] for e in expected]
            assert [t.raw_logprob for t in single.completions[0].tokens] == pytest.approx([e[1] for e in expected], abs=1e-4)


def test_gptj_custom_model_trains_and_serves(gptj_checkpoint, tokenizer, tmp_path):
    """training picks GPT-J's PEFT targets; the adapter it writes serves as PEFT computes it."""
    assert target_modules(gptj_checkpoint) == ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")
    results = train_lora(gptj_checkpoint, TRAIN, [], TrainConfig(rank=4, alpha=8, batch_size=4, epochs=2,
                                                                learning_rate=1e-2), tmp_path)
    assert results[-1].train_loss < results[0].train_loss
    weights = load_file(results[-1].path / "adapter_model.safetensors")
    assert len(weights) == 2 * 2 * 6 and "base_model.model.transformer.h.1.mlp.fc_in.lora_B.weight" in weights
    ref = AdapterRef("trained", str(results[-1].path))
    engine = Engine(load_model(gptj_checkpoint), tokenizer, max_batch=4, max_context=128).start()
    prompt = tokenizer.encode(TRAIN[0].prompt)
    try:
        out = run(engine, [GenerationRequest("t", tuple(prompt), SamplingParams(temperature=0, max_tokens=3),
                                             adapter=ref)])[0]
    finally:
        engine.stop()
    got = out.completions[0].tokens
    expected = reference_greedy(peft_reference(gptj_checkpoint, ref), prompt, 3)[:len(got)]  # it may learn to stop
    assert len(got) == 3 or got[-1].token_id == 2
    assert [t.token_id for t in got] == [e[0] for e in expected]
    assert [t.raw_logprob for t in got] == pytest.approx([e[1] for e in expected], abs=1e-4)
