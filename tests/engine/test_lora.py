"""Per-row LoRA adapters against PEFT's own model (the reference), and mixed batches against runs alone."""
from __future__ import annotations

import json
import time
from pathlib import Path

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


# The resident store and the lanes, on many small adapters written straight as PEFT files.

def write_adapter(model, directory, seed: int, rank: int):
    """A random PEFT adapter on every projection of `model`, written without PEFT (150 of them in a
    second): the file layout and names PEFT saves."""
    from safetensors.torch import save_file

    from amber.engine.models import family_of
    family, g = family_of(model), torch.Generator().manual_seed(seed)
    weights = {}
    for i, layer in enumerate(model.model.layers):
        for target in family.lora_targets:
            module = layer.get_submodule(target)
            sizes = family.part_sizes(model.config, target, module.out_features)
            for part, size in zip(family.hf_parts(model.config, target), sizes):
                stem = f"base_model.model.model.layers.{i}.{part}"
                weights[f"{stem}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
                weights[f"{stem}.lora_B.weight"] = torch.randn(size, rank, generator=g) * 0.3
    directory.mkdir(parents=True)
    save_file(weights, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ALL_LINEAR}))
    return AdapterRef(f"many-{seed}", str(directory))


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def many(tiny_model, tmp_path_factory):
    """150 adapters of ranks 4, 8 and 16."""
    root = tmp_path_factory.mktemp("many")
    return [write_adapter(tiny_model, root / str(i), i, (4, 8, 16)[i % 3]) for i in range(150)]


@pytest.fixture
def slots(tiny_model):
    from amber.engine.lora import AdapterSlots
    slots = AdapterSlots(tiny_model, capacity=9)
    yield slots
    slots.close()


def wait_for(slots, ref, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not slots.request(ref):
        assert time.monotonic() < deadline, f"{ref.key} never loaded"
        time.sleep(0.01)


def test_the_resident_store_keeps_the_128_most_recently_used_and_never_a_pinned_one(slots, many):
    held = slots.acquire(many[0])  # the oldest, but pinned
    for ref in many[1:]:
        slots.release(slots.acquire(ref))
    assert slots.loaded() == 128
    resident = [ref.key in slots.store for ref in many]
    assert resident == [True] + [False] * 22 + [True] * 127
    slots.request(many[23])  # a request counts as a use: many[24] is now the least recent unpinned
    slots.release(held)
    slots.release(slots.acquire(many[1]))  # read again; evicts many[0], now unpinned and oldest
    assert many[1].key in slots.store and many[23].key in slots.store
    assert many[0].key not in slots.store and many[24].key in slots.store
    assert slots.loaded() == 128
    assert slots.request(many[0])  # no longer resident, but still in its lane: nothing to read


def test_a_request_loads_in_the_background_then_answers_true(slots, many):
    assert slots.request(many[5]) is False
    assert slots.request(many[5]) is False  # queued once
    wait_for(slots, many[5])
    assert slots.loaded() == 1 and slots.can_acquire(many[5])
    lane = slots.acquire(many[5])
    assert lane == 1 and slots.in_use() == 1


def test_a_failed_background_load_raises_once_then_is_retried(slots, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 16}))
    bad = AdapterRef("broken", str(tmp_path))
    deadline = time.monotonic() + 30
    with pytest.raises(AdapterError):
        while not slots.request(bad):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert slots.request(bad) is False  # forgotten: this queued a new try
    with pytest.raises(AdapterError):
        wait_for(slots, bad)
    assert slots.loaded() == 0


def reference_add(model, ref: AdapterRef, layer: int, target: str, x, y, dtype=torch.float32):
    """y + x A^T B^T (alpha / r) per part of `target`, straight from the adapter's files, A and B
    rounded to `dtype` first, as the lanes hold them (alpha / r = 2 here: scaling B is exact)."""
    from safetensors.torch import load_file

    from amber.engine.models import family_of
    family = family_of(model)
    config = json.loads((Path(ref.path) / "adapter_config.json").read_text())
    weights, scale = load_file(Path(ref.path) / "adapter_model.safetensors"), config["lora_alpha"] / config["r"]
    updates = []
    for part in family.hf_parts(model.config, target):
        stem = f"base_model.model.model.layers.{layer}.{part}"
        a, b = (weights[f"{stem}.lora_{m}.weight"].to(dtype).float() for m in "AB")
        updates.append(x @ a.t() @ b.t() * scale)
    return y + torch.cat(updates, dim=-1)


@pytest.mark.parametrize("rows_of", [[0, 1, 2, 3, 4, 5], [0, None, 1, 2, None, 3, 4, 5], [2, 2, 2]])
def test_a_batch_over_adapters_of_different_ranks_equals_per_row_math(slots, many, tiny_model, rows_of):
    from amber.engine.models import family_of
    chosen = many[:6]  # ranks 4, 8, 16, 4, 8, 16: the lanes grow twice
    lanes = [slots.acquire(ref) for ref in chosen]
    row_refs = [None if i is None else chosen[i] for i in rows_of]
    seq, g = 2, torch.Generator().manual_seed(0)
    lora = slots.batch([0 if ref is None else lanes[chosen.index(ref)] for ref in row_refs], seq)
    if slots.kernel:  # the compiled op: each row's lane, no mask
        assert lora.mask is None and lora.lanes.tolist() == [lanes[chosen.index(ref)] - 1 if ref else -1
                                                             for ref in row_refs for _ in range(seq)]
    else:
        assert (lora.mask is None) == (len(set(rows_of)) == 1)
    for t, target in enumerate(family_of(tiny_model).lora_targets):
        module = tiny_model.model.layers[0].get_submodule(target)
        for layer in range(len(tiny_model.model.layers)):
            x = torch.randn(len(row_refs), seq, module.in_features, generator=g)
            y = torch.randn(len(row_refs), seq, module.out_features, generator=g)
            got = lora.add(layer, t, x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1]).clone()).view(y.shape)
            for row, ref in enumerate(row_refs):
                want = y[row] if ref is None else reference_add(tiny_model, ref, layer, target, x[row], y[row],
                                                                slots.dtype)
                torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)
                if ref is None:
                    assert torch.equal(got[row], want)


def int8_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row rounded to 255 levels of its own: s * round(row / s), s = max |row| / 127."""
    s = rows.abs().amax(dim=-1, keepdim=True) / 127
    return (rows / s).round() * s


def test_int8_lanes_beside_quantized_weights_equal_per_row_math_on_rows_rounded_alone(kernel, tiny_checkpoint, many):
    """Beside int4 base weights the lanes are int8, a scale per row of A and of (scaled) B^T: each
    row's update equals x A'^T B'^T with A' and B'^T rounded row by row here, from the files."""
    from safetensors.torch import load_file

    from amber.engine.lora import AdapterSlots
    from amber.engine.models import family_of
    model = load_model(tiny_checkpoint, "int4")
    slots = AdapterSlots(model, capacity=4)
    try:
        assert slots.dtype == torch.int8
        chosen = [many[0], many[4], many[2]]  # ranks 4, 8, 16
        lanes = [slots.acquire(ref) for ref in chosen]
        lora = slots.batch([lanes[1], 0, lanes[0], lanes[2]], 1)
        g = torch.Generator().manual_seed(0)
        for t, target in enumerate(family_of(model).lora_targets):
            module = model.model.layers[0].get_submodule(target)
            x = torch.randn(4, module.in_features, generator=g)
            y = torch.randn(4, module.out_features, generator=g)
            got = lora.add(1, t, x, y.clone())
            assert torch.equal(got[1], y[1])
            for row, ref in ((0, chosen[1]), (2, chosen[0]), (3, chosen[2])):
                weights = load_file(Path(ref.path) / "adapter_model.safetensors")
                updates = []
                for part in family_of(model).hf_parts(model.config, target):
                    stem = f"base_model.model.model.layers.1.{part}"
                    a, b = weights[f"{stem}.lora_A.weight"], weights[f"{stem}.lora_B.weight"]
                    updates.append(x[row] @ int8_rows(a).t() @ int8_rows(b.t() * 2))
                torch.testing.assert_close(got[row], y[row] + torch.cat(updates), atol=1e-5, rtol=1e-5)
    finally:
        slots.close()


def test_lanes_are_views_reused_without_a_copy(slots, many):
    first = slots.acquire(many[2])  # rank 16: the lanes' rank from the start
    storage = slots.a[0].data_ptr()
    slots.release(first)
    second = slots.acquire(many[3])
    assert second != first and slots.copies == 2
    slots.release(second)
    assert slots.acquire(many[2]) == first and slots.copies == 2  # still in its lane: no copy
    lora = slots.batch([first, 0, second], 1)
    assert slots.a[0].data_ptr() == storage
    for view, lanes in [(lora.a[0], slots.a[0]), (lora.bt[0][0], slots.bt[0][0])]:
        assert view.untyped_storage().data_ptr() == lanes.untyped_storage().data_ptr()
    if slots.kernel:
        assert lora.lanes.tolist() == [first - 1, -1, second - 1]
    else:
        assert lora.mask.shape == (3, 2 * slots.rank)


def test_an_adapter_leaving_takes_the_least_recently_used_free_lane(tiny_model, many):
    from amber.engine.lora import AdapterSlots
    slots = AdapterSlots(tiny_model, capacity=3)  # lanes 1 and 2
    one, two = slots.acquire(many[0]), slots.acquire(many[1])
    with pytest.raises(AdapterError):
        slots.acquire(many[2])
    assert not slots.can_acquire(many[2]) and slots.can_acquire(many[1])
    slots.release(two)
    slots.release(one)
    assert slots.acquire(many[2]) == two and slots.in_use() == 1  # lane 2 was released first


def test_zipf_traffic_over_many_adapters_equals_each_request_alone(tiny_checkpoint, many):
    """60 requests over 40 adapters of ranks 4, 8 and 16, Zipf-distributed (a few adapters get
    most requests), submitted at once into 6 lanes and a host store of 24: adapters are read on the
    reader's thread, placed in lanes and evicted while others run; each greedy answer is the one
    the same request gets alone."""
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    engine = Engine(load_model(tiny_checkpoint), tokenizer, max_batch=5, max_context=128, prefill_chunk=16,
                    resident_adapters=24).start()
    rng = __import__("random").Random(3)
    weights = [1 / (k + 1) for k in range(40)]
    picks = rng.choices(range(40), weights=weights, k=60)
    prompts = [tokenizer.encode(f"request {i} for adapter {a}") for i, a in enumerate(picks)]
    requests = [GenerationRequest(f"z{i}", tuple(p), SamplingParams(temperature=0, max_tokens=6), adapter=many[a])
                for i, (p, a) in enumerate(zip(prompts, picks))]
    try:
        together = run(engine, requests)
        assert engine.adapters.loaded() <= 24 and engine.adapters.copies > 6  # lanes were reused and refilled
        alone = [run(engine, [GenerationRequest(f"alone{i}", r.prompt_ids, r.params, adapter=r.adapter)])[0]
                 for i, r in enumerate(requests)]
    finally:
        engine.stop()
    assert len(set(picks)) > 15
    for a, b in zip(together, alone):
        assert [t.token_id for t in a.completions[0].tokens] == [t.token_id for t in b.completions[0].tokens]
