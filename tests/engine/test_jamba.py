"""What only the Jamba family has: a tiny random Jamba (conftest.py: Mamba, attention, dense and MoE
layers) with recurrent states in the cache owner (carried across prefill chunks, reset for a new
prompt, freed by cancellation), no prefix cache, and the context limit. What every family does
(batching, every precision with int8 experts, LoRA adapters, training) is in test_families.py."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from amber.engine.engine import ContextTooLong, Engine
from amber.engine.kv_cache import KVCache
from amber.engine.loader import load_model
from amber.engine.models import FullAttention, Recurrent, family_for, family_of
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import GenerationRequest, SamplingParams
from tests.engine.test_engine import BOS, reference_greedy, run
from tests.engine.test_families import prompt_logprobs

TEXT = "Jamba interleaves attention with Mamba layers, and routes each token through two of its experts."
MAMBA, ATTENTION = Recurrent((128, 3), (128, 8)), FullAttention(2, 16)


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
