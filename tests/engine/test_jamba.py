"""The Jamba family through one engine: a tiny random Jamba (transformers' JambaConfig, built on the
fly: Mamba, attention, dense and MoE layers) against transformers' own forward, its recurrent
states in the cache owner (chunks, numResults, slot moves, cancellation), the batched engine
against one request at a time, every precision with int8 experts, LoRA adapters against PEFT,
training, and the context limit."""
from __future__ import annotations

import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from amber.engine.engine import ContextTooLong, Engine
from amber.engine.kv_cache import KVCache
from amber.engine.loader import load_model
from amber.engine.models import FullAttention, Recurrent, family_for, family_of
from amber.engine.quantize import Int4Linear, Int8Linear
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import AdapterRef, GenerationRequest, SamplingParams
from amber.training.lora import TrainConfig, target_modules, train_lora
from tests.engine.test_engine import BOS, reference_greedy, run
from tests.engine.test_families import prompt_logprobs
from tests.engine.test_lora import make_adapter, peft_reference
from tests.training.test_lora import TRAIN

TEXT = "Jamba interleaves attention with Mamba layers, and routes each token through two of its experts."
PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog. " * 2, "1 2 3", "A"]
MAMBA, ATTENTION = Recurrent((128, 3), (128, 8)), FullAttention(2, 16)


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
    directory = tmp_path_factory.mktemp("tiny-jamba")
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_checkpoint / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def reference(jamba_checkpoint):
    return AutoModelForCausalLM.from_pretrained(jamba_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(jamba_checkpoint):
    return Tokenizer.from_pretrained(jamba_checkpoint)


@pytest.fixture(scope="module")
def engine(jamba_checkpoint, tokenizer):
    engine = Engine(load_model(jamba_checkpoint), tokenizer, max_batch=8, max_context=128, prefill_chunk=5).start()
    yield engine
    engine.stop()


def req(rid, prompt, adapter=None, **kw):
    return GenerationRequest(rid, tuple(prompt), SamplingParams(**{"temperature": 0.0, **kw}), adapter=adapter)


def greedy_matches(reference, request, out, abs=1e-4):
    """Every completion of `out` is transformers' greedy continuation, logprobs included."""
    expected = reference_greedy(reference, list(request.prompt_ids), request.params.max_tokens)
    for completion in out.completions:
        assert [t.token_id for t in completion.tokens] == [e[0] for e in expected]
        assert [t.raw_logprob for t in completion.tokens] == pytest.approx([e[1] for e in expected], abs=abs)


@pytest.mark.supports("jamba", "prefix cache", cell="off (recurrent state)")
def test_jamba_declares_attention_and_recurrent_layers(jamba_checkpoint, engine):
    model = engine.model
    assert family_of(model) is family_for("jamba")
    assert family_for("jamba").layer_states(model.config) == [MAMBA, ATTENTION, MAMBA, ATTENTION]
    cache = engine.cache
    assert cache.keys.shape[0] == 2 and cache.attention_index == [-1, 0, -1, 1]  # keys for attention only
    assert cache.recurrent.conv.shape == (2, 9, 128, 3) and cache.recurrent.ssm.shape == (2, 9, 128, 8)
    assert engine.prefixes.max_blocks == 0  # no prefix cache for recurrent states
    moe = model.model.layers[1].feed_forward
    assert len(moe.experts) == 4 and isinstance(moe.experts[0].gate_proj, nn.Linear)
    assert not hasattr(model, "forward_rows")


@pytest.mark.supports("jamba", "prompt logprobs", "float32")
def test_jamba_logprobs_equal_transformers_forward_whole_and_in_chunks(jamba_checkpoint, reference, tokenizer,
                                                                       engine):
    prompt = tokenizer.encode(TEXT)
    ids = [BOS, *prompt]
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    model = load_model(jamba_checkpoint)
    assert (prompt_logprobs(model, ids) - expected).abs().max() < 1e-4
    # the engine scores a long prompt 5 tokens a step: the Mamba states carry from chunk to chunk
    (out,) = run(engine, [req("chunks", prompt, max_tokens=0, top_k_return=2)])
    assert [t.logprob for t in out.prompt] == pytest.approx([float(expected[i, t]) for i, t in enumerate(prompt)],
                                                            abs=1e-4)


def test_a_prompt_from_position_zero_ignores_what_the_slot_held(jamba_checkpoint, tokenizer):
    """A slot's old recurrent state (a finished or cancelled request's) must not leak into the next."""
    model, ids = load_model(jamba_checkpoint), [BOS, *tokenizer.encode(TEXT)]
    cfg, family = model.config, family_of(model)
    clean, dirty = (KVCache.for_layers(family.layer_states(cfg), 2, len(ids), torch.float32) for _ in range(2))
    dirty.recurrent.conv.fill_(3.0)
    dirty.recurrent.ssm.fill_(-5.0)
    with torch.inference_mode():
        outs = [model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, slice(1, 2))
                for cache in (clean, dirty)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(clean.recurrent.ssm[:, 1], dirty.recurrent.ssm[:, 1])
    assert torch.equal(clean.recurrent.conv[:, 1], dirty.recurrent.conv[:, 1])


@pytest.mark.supports("jamba", "complete", "batching")
@pytest.mark.parametrize("mode", ["float32", "int8"])
def test_jamba_batched_engine_equals_one_request_at_a_time(jamba_checkpoint, reference, tokenizer, mode):
    """numResults 2 shares each prompt's states; short prompts prefill together (one row at a time,
    as a recurrent family must), the long one in chunks; finished rows move down into freed slots."""
    engine = Engine(load_model(jamba_checkpoint, mode), tokenizer, max_batch=8, max_context=128,
                    prefill_chunk=12).start()
    try:
        requests = [req(f"r{i}", tokenizer.encode(p), max_tokens=6 + 2 * i, num_results=2)
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
            greedy_matches(reference, request, single)


def test_a_request_aborted_mid_decode_leaves_no_state_behind(engine, reference, tokenizer):
    prompt, seen, three = tokenizer.encode("A long story that will be cut short"), [], threading.Event()

    def on_tokens(tokens):
        seen.extend(tokens)
        if len(seen) >= 3:
            three.set()

    done = threading.Event()
    engine.submit(req("cut", prompt, max_tokens=60), lambda out: done.set(), on_tokens)
    assert three.wait(60)
    engine.abort("cut")
    assert done.wait(60)
    assert not engine.scheduler.rows and not engine.busy
    after = req("after", tokenizer.encode("Hello there"), max_tokens=8)
    greedy_matches(reference, after, run(engine, [after])[0])  # the slot's old state left no trace


# mean |logprob - fp32| over TEXT's tokens, measured: bfloat16 0.043 (transformers' own bf16 Jamba: the
# same 0.043), int8 0.075, int8-bf16 0.105, int4 0.61; limits about twice that. The int8 experts alone
# move 0.003 (the rest is the int8 head, 0.046, and the Mamba and attention projections); int4 is
# lossy on random weights that were never on a 4-bit grid, most in the Mamba in/out and attention
# projections (0.35, 0.34, 0.28 each with the int8 head), and the logits are scaled x40
@pytest.mark.parametrize("mode, tolerance", [pytest.param(m, t, marks=pytest.mark.supports("jamba", m)) for m, t in
                                             [("bfloat16", 0.09), ("int8", 0.15), ("int8-bf16", 0.2), ("int4", 1.2)]])
def test_jamba_precisions_quantize_the_experts_and_stay_close(jamba_checkpoint, tokenizer, mode, tolerance):
    ids = [BOS, *tokenizer.encode(TEXT)]
    exact = load_model(jamba_checkpoint)
    model = load_model(jamba_checkpoint, mode)
    if mode != "bfloat16":
        low_bit = Int4Linear if mode == "int4" else Int8Linear
        moe, mamba = model.model.layers[1].feed_forward, model.model.layers[0].mamba
        assert all(isinstance(getattr(expert, name), low_bit)
                   for expert in moe.experts for name in ("gate_proj", "up_proj", "down_proj"))
        assert isinstance(mamba.in_proj, low_bit) and isinstance(model.lm_head, Int8Linear)
        # the router and dt_proj stay as they are (family.unquantized)
        assert type(moe.router) is nn.Linear and type(mamba.dt_proj) is nn.Linear
    picked = torch.tensor(ids[1:]).unsqueeze(1)
    drift = (prompt_logprobs(model, ids)[:-1].gather(1, picked) - prompt_logprobs(exact, ids)[:-1].gather(1, picked))
    assert drift.abs().mean() < tolerance, f"{mode}: mean |logprob - fp32| {drift.abs().mean():.4f}"


@pytest.mark.supports("jamba", "custom models")
def test_jamba_adapters_equal_peft_and_mix_with_base_rows(jamba_checkpoint, engine, tokenizer, tmp_path):
    """Attention, Mamba and dense-MLP projections take adapters; MoE layers' experts do not."""
    adapter = make_adapter(jamba_checkpoint, tmp_path / "a", 1, 8, list(family_for("jamba").peft_targets))
    partial = make_adapter(jamba_checkpoint, tmp_path / "b", 2, 4, ["q_proj", "in_proj", "down_proj"])
    prompt = tokenizer.encode("Adapters on Jamba")
    requests = [req(f"m{i}", prompt, a, max_tokens=8) for i, a in enumerate([adapter, None, partial])]
    mixed = run(engine, requests)
    alone = [run(engine, [r])[0] for r in requests]
    for request, together, single in zip(requests, mixed, alone):
        assert ([t.token_id for t in together.completions[0].tokens]
                == [t.token_id for t in single.completions[0].tokens])
        if request.adapter is not None:
            greedy_matches(peft_reference(jamba_checkpoint, request.adapter), request, single)
    assert len({tuple(t.token_id for t in o.completions[0].tokens) for o in alone}) == 3, "adapters changed nothing"


@pytest.mark.supports("jamba", "custom models")
def test_jamba_custom_model_trains_and_serves(jamba_checkpoint, tokenizer, tmp_path):
    """training picks Jamba's PEFT targets; the adapter it writes serves as PEFT computes it."""
    assert target_modules(jamba_checkpoint) == family_for("jamba").peft_targets
    results = train_lora(jamba_checkpoint, TRAIN, [], TrainConfig(rank=4, alpha=8, batch_size=4, epochs=2,
                                                                 learning_rate=1e-2), tmp_path)
    assert results[-1].train_loss < results[0].train_loss
    weights = load_file(results[-1].path / "adapter_model.safetensors")
    # Mamba layers 0, 2: in/out_proj + gate/up/down; attention layers 1, 3: q/k/v/o (experts: none)
    assert len(weights) == 2 * (2 * 5 + 2 * 4)
    assert "base_model.model.model.layers.0.mamba.in_proj.lora_B.weight" in weights
    ref = AdapterRef("trained", str(results[-1].path))
    engine = Engine(load_model(jamba_checkpoint), tokenizer, max_batch=4, max_context=128).start()
    prompt = tokenizer.encode(TRAIN[0].prompt)
    try:
        out = run(engine, [req("t", prompt, ref, max_tokens=3)])[0]
    finally:
        engine.stop()
    got = out.completions[0].tokens
    expected = reference_greedy(peft_reference(jamba_checkpoint, ref), prompt, 3)[:len(got)]  # it may learn to stop
    assert len(got) == 3 or got[-1].token_id == 2
    assert [t.token_id for t in got] == [e[0] for e in expected]
    assert [t.raw_logprob for t in got] == pytest.approx([e[1] for e in expected], abs=1e-4)


def test_a_prompt_at_the_context_limit_is_served_and_one_past_it_is_refused(jamba_checkpoint, reference, tokenizer):
    engine = Engine(load_model(jamba_checkpoint), tokenizer, max_batch=4, max_context=24, prefill_chunk=8).start()
    try:
        prompt = tokenizer.encode(TEXT)[:19]
        at_limit = req("fits", prompt, max_tokens=4)  # BOS + 19 + 4 = 24 positions
        greedy_matches(reference, at_limit, run(engine, [at_limit])[0])
        for too_long in (req("over", prompt, max_tokens=5), req("prompt", tokenizer.encode(TEXT * 2), max_tokens=1)):
            with pytest.raises(ContextTooLong, match="the context is 24"):
                engine.submit(too_long, lambda out: None)
        assert not engine.busy
        greedy_matches(reference, at_limit, run(engine, [at_limit])[0])  # still serving
    finally:
        engine.stop()
