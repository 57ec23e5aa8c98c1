"""Per-row LoRA adapters against PEFT's own model (the reference), and mixed batches against runs alone."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from amber.engine.engine import Engine
from amber.engine.lora import AdapterError
from amber.engine.loader import load_model
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import AdapterRef, GenerationRequest, SamplingParams
from tests.engine import same_cache
from tests.engine.test_engine import BOS, reference_greedy, run

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(checkpoint, directory, seed: int, rank: int, targets: list[str]):
    """A PEFT adapter with random, non-zero A and B (PEFT starts B at zero, which would test nothing)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(directory)
    return AdapterRef(f"adapter-{seed}", str(directory))


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_checkpoint, root / "a", 1, 8, ALL_LINEAR),
            make_adapter(tiny_checkpoint, root / "b", 2, 4, ["q_proj", "v_proj", "down_proj"]),
            make_adapter(tiny_checkpoint, root / "c", 3, 16, ["o_proj", "up_proj"])]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = Engine(load_model(tiny_checkpoint), Tokenizer.from_pretrained(tiny_checkpoint),
                    max_batch=8, max_context=256, prefill_chunk=7).start()
    yield engine
    engine.stop()


def peft_reference(checkpoint, adapter: AdapterRef):
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter.path).eval()


def req(rid, prompt, adapter=None, **kw):
    return GenerationRequest(rid, tuple(prompt), SamplingParams(**{"temperature": 0.0, **kw}), adapter=adapter)


def ids(out):
    return [t.token_id for t in out.completions[0].tokens]


@pytest.mark.supports("llama", "custom models")
def test_adapter_rows_equal_peft_and_base_rows_equal_the_base(engine, adapters, tiny_checkpoint):
    tok = engine.tokenizer
    prompt = tok.encode("A prompt long enough to span a few prefill chunks of seven tokens")
    requests = [req("base", prompt, max_tokens=10), *(req(a.key, prompt, a, max_tokens=10) for a in adapters)]
    outs = run(engine, requests)
    base_ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    for out, adapter in zip(outs, [None, *adapters]):
        ref = base_ref if adapter is None else peft_reference(tiny_checkpoint, adapter)
        expected = reference_greedy(ref, prompt, 10)
        assert ids(out) == [e[0] for e in expected], adapter
        # fp32 rounding only: this tiny model's logits are scaled up 40x, and so are rounding errors
        for t, (_, raw, _) in zip(out.completions[0].tokens, expected):
            assert t.logprob == pytest.approx(raw, abs=5e-4)
        with torch.inference_mode():
            lp = ref(torch.tensor([[BOS, *prompt]])).logits[0].log_softmax(-1)
        assert [t.logprob for t in out.prompt] == pytest.approx(
            [float(lp[i, t]) for i, t in enumerate(prompt)], abs=5e-4)
    assert len({tuple(ids(o)) for o in outs}) == len(outs), "the adapters changed nothing"


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(engine, adapters):
    tok = engine.tokenizer
    prompts = [tok.encode(t) for t in ["one", "two words", "a third prompt here", "four"]]
    plan = [(prompts[0], None), (prompts[1], adapters[0]), (prompts[2], adapters[1]), (prompts[3], adapters[0]),
            (prompts[0], adapters[2]), (prompts[1], None)]
    alone = [run(engine, [req(f"alone{i}", p, a, max_tokens=9, top_k_return=2)])[0] for i, (p, a) in enumerate(plan)]
    together = run(engine, [req(f"mix{i}", p, a, max_tokens=9, top_k_return=2) for i, (p, a) in enumerate(plan)])
    for one, mixed in zip(alone, together):
        assert ids(one) == ids(mixed)
        for x, y in zip(one.completions[0].tokens + one.prompt, mixed.completions[0].tokens + mixed.prompt):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_the_prefix_cache_keeps_adapters_apart(engine, adapters):
    prompt = engine.tokenizer.encode("The same long prompt, over and over again, " * 6)
    base1, custom, base2 = (run(engine, [req(r, prompt, a, max_tokens=4)])[0]
                            for r, a in [("p1", None), ("p2", adapters[0]), ("p3", None)])
    assert ids(base1) == ids(base2) and ids(custom) != ids(base1)
    assert [t.logprob for t in custom.prompt] != pytest.approx([t.logprob for t in base1.prompt])


def test_a_broken_adapter_fails_its_request_only(engine, adapters, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 16}))  # no rank, no weights
    bad = AdapterRef("broken", str(tmp_path))
    prompt = engine.tokenizer.encode("still serving")
    broken, fine = run(engine, [req("bad", prompt, bad, max_tokens=3), req("ok", prompt, adapters[1], max_tokens=3)])
    assert isinstance(broken, AdapterError)
    assert len(ids(fine)) == 3


def test_least_recently_used_adapters_are_evicted_and_reloaded(tiny_checkpoint, adapters):
    small = Engine(load_model(tiny_checkpoint), Tokenizer.from_pretrained(tiny_checkpoint),
                   max_batch=1, max_context=128).start()  # two adapter slots for three adapters
    try:
        prompt = small.tokenizer.encode("rotate")
        first = [ids(run(small, [req(a.key, prompt, a, max_tokens=5)])[0]) for a in adapters]
        again = [ids(run(small, [req(a.key + "'", prompt, a, max_tokens=5)])[0]) for a in adapters]
        assert first == again
    finally:
        small.stop()


@pytest.mark.parametrize("mode", ["float32", "int4"])
@pytest.mark.parametrize("scripted", [True, False])
def test_the_scripted_decode_step_adds_adapters_as_forward_does_bit_for_bit(tiny_checkpoint, adapters, mode,
                                                                            scripted, monkeypatch):
    import amber.engine.models.llama_decode as decode_step
    from amber.engine.kv_cache import KVCache
    from amber.engine.lora import AdapterSlots
    if not scripted:
        monkeypatch.setitem(decode_step._scripted, "decode_rows", decode_step.decode_rows)
    model = load_model(tiny_checkpoint, mode)
    cfg = model.config
    slots = AdapterSlots(model, 4)
    loaded = [slots.acquire(a) for a in adapters]
    general, fast = (KVCache(cfg.num_hidden_layers, 6, cfg.num_key_value_heads, 64, cfg.head_dim,
                             model.kv_dtype or torch.float32) for _ in range(2))
    with torch.inference_mode():
        for cache in (general, fast):
            for slot in range(6):
                model(torch.arange(1, 4 + slot)[None], torch.arange(3 + slot)[None], cache, slice(slot, slot + 1))
        for row_slots in ([loaded[0]], [loaded[1], 0], [0, loaded[2], loaded[0], loaded[2], 0, loaded[1]]):
            rows = len(row_slots)
            tokens, positions = [5 * r + 2 for r in range(rows)], [3 + r for r in range(rows)]
            lora = slots.batch(row_slots, 1)
            expected = model(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], general,
                             slice(0, rows), lora)[:, 0]
            assert torch.equal(model.forward_rows(tokens, positions, fast, lora), expected)
    assert same_cache(general, fast)
