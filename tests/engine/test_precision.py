"""Every precision mode: the batched engine still equals the slow loop on the same weights, int8
and int4 matrices are what they claim, and the real model stays close to fp32."""
from __future__ import annotations

import gc
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from amber.engine import paged_ops
from amber.engine.engine import Engine
from amber.engine.kv_cache import KVCache
from amber.engine.loader import load_model
from amber.engine.models import family_of
from amber.engine.kernels import UNLIMITED, Choice
from amber.engine.quantize import Int4Linear, Int8Embedding, Int8Linear, QuantizedLinear, compact_embedding
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import GenerationRequest, SamplingParams
from tests.conftest import REPO
from tests.engine import same_cache

MODES = ["float32", "bfloat16", "int8", "int8-bf16", "int4"]


def run(engine, requests):
    results, done = {}, threading.Event()
    for r in requests:
        engine.submit(r, lambda out, rid=r.request_id: (results.__setitem__(rid, out),
                                                         len(results) == len(requests) and done.set()))
    assert done.wait(120)
    return [results[r.request_id] for r in requests]


def two_caches(model, slots: int) -> tuple[KVCache, KVCache]:
    """Two like caches of `slots` slots x 64 positions: one for the forward, one for a fast path."""
    cfg = model.config
    return tuple(KVCache(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, 64, cfg.head_dim,
                         model.kv_dtype or model.activation_dtype) for _ in range(2))


@torch.inference_mode()
def slow_greedy(model, prompt, steps):
    """Recompute the whole sequence for every token, in a fresh cache: no reuse of any kind."""
    cfg, seq, out = model.config, [1, *prompt], []
    for _ in range(steps):
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, len(seq), cfg.head_dim,
                        model.kv_dtype or model.activation_dtype)
        hidden = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), cache, slice(0, 1))
        logprobs = model.logits(hidden[0, -1]).log_softmax(-1)
        token = int(logprobs.argmax())
        out.append((token, float(logprobs[token])))
        seq.append(token)
    return out


@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.supports("llama", m)) for m in MODES])
def test_batched_engine_equals_the_slow_loop_in_every_mode(tiny_checkpoint, mode):
    model = load_model(tiny_checkpoint, mode)
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    engine = Engine(model, tokenizer, max_batch=6, max_context=128, prefill_chunk=5).start()
    try:
        prompts = [tokenizer.encode(t) for t in ["Precision matters", "a b c d e f g h i j k l m n o p", "Hi"]]
        outs = run(engine, [GenerationRequest(f"r{i}", tuple(p), SamplingParams(temperature=0, max_tokens=8 + 2 * i,
                                                                              num_results=1 + i % 2))
                            for i, p in enumerate(prompts)])
    finally:
        engine.stop()
    # int8, int4: the one-row decode kernel rounds its inputs and outputs to bf16, the many-row
    # path multiplies the same weights as bf16; the two differ by bf16 noise
    # (this random model's logits are scaled x40, which magnifies that noise)
    tol = {"float32": 1e-4, "bfloat16": 0.05}.get(mode, 0.3)
    for i, (p, out) in enumerate(zip(prompts, outs)):
        expected = slow_greedy(model, p, 8 + 2 * i)
        for c in out.completions:
            for t, (token, lp) in zip(c.tokens, expected):
                assert t.logprob == pytest.approx(lp, abs=tol)
                if t.token_id != token:  # only a near-tie may flip under rounding; then paths part
                    assert mode != "float32", "fp32 must follow the slow loop exactly"
                    break


@pytest.mark.supports("llama", "fast decode", cell="TorchScript, bit for bit")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scripted", [True, False])
def test_the_single_token_path_equals_the_batched_forward_bit_for_bit(tiny_checkpoint, mode, scripted, monkeypatch):
    import amber.engine.models.llama_decode as decode_step
    if not scripted:  # the fallback where TorchScript is unavailable: the same function in Python
        monkeypatch.setitem(decode_step._scripted, "decode_layers", decode_step.decode_layers)
    else:
        assert decode_step.scripted(decode_step.decode_layers) is not decode_step.decode_layers, "TorchScript compiled it"
    model = load_model(tiny_checkpoint, mode)
    batched, single = two_caches(model, 2)
    with torch.inference_mode():
        for cache in (batched, single):
            model(torch.tensor([[1, 5, 9, 13, 17]]), torch.arange(5)[None], cache, slice(1, 2))
        for position, token in enumerate([21, 4, 8, 30000], start=5):
            expected = model(torch.tensor([[token]]), torch.tensor([[position]]), batched, slice(1, 2))[0]
            assert torch.equal(model.forward_one(token, position, 1, single), expected)
    assert same_cache(batched, single)


# the kernels each quantized layer may be given (engine/kernels.py): as measured here, and the
# other possible choices forced, so every path meets the test whatever this CPU prefers
CHOICES = {"measured": None, "fused<=4,bf16": Choice(4, "bf16"), "fused<=4,fp32": Choice(4, "fp32"),
           "fused only": Choice(UNLIMITED, None), "fp32 only": Choice(0, "fp32")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scripted", [True, False])
@pytest.mark.parametrize("choice", CHOICES)
def test_the_batch_decode_path_equals_the_batched_forward_bit_for_bit(tiny_checkpoint, mode, scripted, choice,
                                                                       monkeypatch):
    import amber.engine.models.llama_decode as decode_step
    if not scripted:
        monkeypatch.setitem(decode_step._scripted, "decode_rows", decode_step.decode_rows)
    if choice != "measured" and mode not in ("int8", "int8-bf16", "int4"):
        pytest.skip("only quantized layers have kernels to choose")
    model = load_model(tiny_checkpoint, mode)
    if CHOICES[choice] is not None:
        for layer in model.modules():
            if isinstance(layer, QuantizedLinear):
                layer.use(CHOICES[choice])
    general, fast = two_caches(model, 12)
    with torch.inference_mode():
        for cache in (general, fast):  # 12 rows of different lengths: 3..14 prompt tokens
            for slot in range(12):
                model(torch.arange(1, 4 + slot)[None], torch.arange(3 + slot)[None], cache, slice(slot, slot + 1))
        for rows in (2, 5, 8, 12):  # either side of the forced row limit (4), and of most measured ones
            tokens = [7 * r + rows for r in range(rows)]
            positions = [3 + r for r in range(rows)]
            expected = model(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], general,
                             slice(0, rows))[:, 0]
            assert torch.equal(model.forward_rows(tokens, positions, fast), expected)
    assert same_cache(general, fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_per_channel_symmetric_and_both_paths_agree(dtype):
    torch.manual_seed(0)
    weight = (torch.randn(96, 64) * torch.linspace(0.01, 3, 96).unsqueeze(1)).to(dtype)
    q = Int8Linear(weight)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    error = (q.dequantized().float() - weight.float()).abs().amax(dim=1)
    assert torch.all(error <= q.scales.float() * 0.5 + 1e-2 * weight.float().abs().amax(dim=1))
    with torch.inference_mode():
        x = torch.randn(q.fused_max_rows * 2, 64).to(dtype)
        fused = torch.cat([q(x[i:i + 1]) for i in range(len(x))])   # one row: the int8 kernel
        dense = q(x)                                                # many rows: dequantized GEMM
        # matmul inputs go in as bf16 in both paths; outputs reach ~25, where bf16 rounding is ~0.1
        torch.testing.assert_close(fused.float(), dense.float(), atol=0.25, rtol=0.02)
        torch.testing.assert_close(dense.float(), (x.float() @ weight.float().T), atol=0.5, rtol=0.05)


def q4_1_weight(out_features: int, in_features: int) -> torch.Tensor:
    """Weights as a Q4_1 GGUF stores them: per 32 inputs, a minimum plus 0..15 steps of a scale."""
    groups = in_features // 32
    low = torch.randn(out_features, groups, 1) * 0.02
    step = torch.rand(out_features, groups, 1) * 0.02 + 0.02
    codes = torch.randint(0, 16, (out_features, groups, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # llama.cpp's grid spans each group's min..max
    return (low + codes * step).view(out_features, in_features)


def test_int4_linear_keeps_q4_1_weights_and_both_paths_agree():
    torch.manual_seed(0)
    weight = q4_1_weight(96, 128)
    q = Int4Linear(weight)
    # The grid is recovered exactly; only bf16 rounding (relative 2^-8) remains: of the scale s
    # (times |q - 8| <= 8), of the zero z, and of the result. A wrong grid would be off by up to s / 2.
    groups = weight.view(96, 4, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    zero = groups.amin(-1) + 8 * step
    bound = 2 ** -8 * (8 * step + zero.abs() + groups.abs().amax(-1))
    error = (q.dense_weights().float() - weight).abs().view(96, 4, 32).amax(-1)
    assert torch.all(error <= bound) and bound.max() < step.min() / 2
    # on weights that were never 4-bit it is a plain round-to-nearest on each group's grid
    other = torch.randn(96, 128)
    lossy = Int4Linear(other)
    grid_step = (other.view(96, 4, 32).amax(-1) - other.view(96, 4, 32).amin(-1)) / 15
    assert torch.all((lossy.dense_weights().float() - other).abs().view(96, 4, 32).amax(-1) <= grid_step * 0.55 + 0.02)
    with torch.inference_mode():
        x = torch.randn(q.fused_max_rows * 2, 128)
        fused = torch.cat([q(x[i:i + 1]) for i in range(len(x))])   # one row: the int4 kernel
        dense = q(x)                                                # many rows: the bf16 weights (kept, or made per product)
        assert fused.dtype == dense.dtype == torch.bfloat16
        reference = x.float() @ weight.T
        torch.testing.assert_close(fused.float(), reference, atol=0.03, rtol=0.02)
        torch.testing.assert_close(dense.float(), reference, atol=0.03, rtol=0.02)


def test_int4_falls_back_to_int8_where_the_kernel_cannot_take_the_shape():
    from amber.engine.quantize import quantize
    model = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(96, 40, bias=False))
    quantize(model, 4)
    assert isinstance(model[0], Int4Linear)      # 64 inputs, 96 outputs: the kernel's shape rules hold
    assert isinstance(model[1], Int8Linear)      # 96 inputs are 3 groups of 32, but 40 outputs are not x16


def q8_0_table(rows: int, dim: int) -> torch.Tensor:
    """A table as a Q8_0 GGUF stores it: per 32 values, an int8 times an fp16 scale."""
    codes = torch.randint(-127, 128, (rows, dim // 32, 32)).float()
    codes[..., 0] = 127  # the block's largest magnitude sets its scale
    scales = (torch.rand(rows, dim // 32, 1) * 0.01).half().float()
    scales[0] = 0        # an all-zero row
    return (codes * scales).view(rows, dim)


def test_a_q8_0_embedding_is_kept_as_int8_and_looks_up_the_same_rows_bit_for_bit():
    torch.manual_seed(0)
    table = torch.nn.Embedding.from_pretrained(q8_0_table(320, 64))
    compact = compact_embedding(table)
    assert isinstance(compact, Int8Embedding) and compact.weight.dtype == torch.int8
    ids = torch.tensor([[0, 5, 319], [17, 17, 3]])
    assert torch.equal(compact(ids), table(ids)) and compact(ids).dtype == torch.float32
    assert torch.equal(compact(torch.tensor([42])), table.weight[42:43])
    # a table off the grid, or one that lost it to a bf16 cast, stays as it was
    # (or one whose vocabulary is no multiple of the kernel's 16-row tiles)
    for other in (torch.randn(320, 64), q8_0_table(320, 64).bfloat16(), q8_0_table(320, 64)[:, :40].contiguous(),
                  q8_0_table(300, 64)):
        embedding = torch.nn.Embedding.from_pretrained(other)
        assert compact_embedding(embedding) is embedding


# limits on mean |logprob - fp32| per general model. SmolLM2's GGUF is Q4_1, int4's own grid; Gemma
# 3 270M's stores most projections as Q5_0, which int4 re-rounds (measured: bf16 0.030, int8 0.066,
# int8-bf16 0.070, int4 0.447: the registry serves it in int8)
REAL_LIMITS = {"default_checkpoint": {"bfloat16": 0.05, "int8": 0.05, "int8-bf16": 0.1, "int4": 0.05},
               "gemma_checkpoint": {"bfloat16": 0.05, "int8": 0.1, "int8-bf16": 0.12, "int4": 0.6}}


def next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """The logprob of each next token of `ids`, from one forward over the whole sequence."""
    cache = KVCache.for_layers(family_of(model).layer_states(model.config), 1, len(ids),
                               model.kv_dtype or model.activation_dtype)
    with torch.inference_mode():
        lp = model.logits(model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, slice(0, 1))[0])
    return lp.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


@pytest.mark.slow
@pytest.mark.parametrize("which", list(REAL_LIMITS))
def test_real_model_precision_modes_stay_close_to_fp32(request, which):
    """500 tokens in one forward: more rows than kernel tuning times (256), so each quantized layer
    multiplies them by its dense copy, bf16 or fp32 as this CPU's timings choose (engine/kernels.py).
    Both copies are held to the limit, so the check holds whichever a machine picks, and costs no
    tuning: these modes' layer shapes are served by no other test, so timing them was most of its cost."""
    checkpoint = request.getfixturevalue(which)
    text = (REPO / "tests/data/sst2/dev.jsonl").read_text()[:3000]
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    ids = [tokenizer.bos_id, *tokenizer.encode(text)][:500]
    fp32_model = load_model(checkpoint, "float32")
    fp32 = next_token_logprobs(fp32_model, ids)
    dev = {}
    for mode in REAL_LIMITS[which]:
        model = load_model(checkpoint, mode, tune=False)  # untuned: every dense copy is bf16
        if which == "default_checkpoint" and mode in ("int8", "int4"):
            # SmolLM2's GGUF keeps its token embeddings as Q8_0: served as int8 (30 MB, not 113),
            # every row bit for bit the fp32 model's
            embedding, rows = model.model.embed_tokens, torch.randint(0, model.config.vocab_size, (4, 256))
            assert isinstance(embedding, Int8Embedding) and model.activation_dtype == torch.float32
            assert torch.equal(embedding(rows), fp32_model.model.embed_tokens(rows))
            if paged_ops.available():  # and the tied head multiplies by that very table
                assert model.lm_head.weight is embedding.weight
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.has_fused_kernel()]
        for copy in ("bf16", "fp32") if layers else ("bf16",):  # bfloat16 has no quantized layers
            for layer in layers:
                layer.use(Choice(0, copy))
            dev[mode, copy] = float((next_token_logprobs(model, ids) - fp32).abs().mean())
    print(which, "mean |logprob - fp32| per mode and dense copy:", dev)
    for (mode, copy), deviation in dev.items():
        assert deviation < REAL_LIMITS[which][mode], f"{mode} ({copy} copy): {deviation:.3f}"


@pytest.mark.parametrize("mode", ["float32", "int4"])
def test_without_the_compiled_kernel_decode_gathers_and_still_equals_the_forward(tiny_checkpoint, mode):
    """The path of a machine where the paged attention kernel was not built: each row's positions
    gathered from the pool and SDPA over them, in the scripted step and the forward alike."""
    model = load_model(tiny_checkpoint, mode)
    general, fast = two_caches(model, 6)
    with torch.inference_mode():
        for cache in (general, fast):
            cache.kernel = False
            for slot in range(6):
                model(torch.arange(1, 20 + slot)[None], torch.arange(19 + slot)[None], cache, slice(slot, slot + 1))
        tokens, positions = [7 * r for r in range(6)], [19 + r for r in range(6)]
        expected = model(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], general, slice(0, 6))[:, 0]
        assert torch.equal(model.forward_rows(tokens, positions, fast), expected)
        assert torch.equal(model.forward_one(3, 19, 0, fast), model(torch.tensor([[3]]), torch.tensor([[19]]),
                                                                    general, slice(0, 1))[0])
    assert same_cache(general, fast)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_a_loaded_model_keeps_nothing_of_the_files_mapping(tiny_checkpoint, tmp_path, mode, tied):
    """safetensors maps the whole file, and the mapping stays resident while any tensor viewing it
    lives: after loading, in every mode (quantized ones quantize from the mapping itself), the
    checkpoint's file is no longer mapped. Tied: the embedding doubles as the head."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    if tied:  # the same model with its head tied to its embedding (as SmolLM2's is)
        config = json.loads((checkpoint / "config.json").read_text())
        (checkpoint / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
        state = load_file(checkpoint / "model.safetensors")
        state.pop("lm_head.weight", None)
        save_file(state, checkpoint / "model.safetensors", metadata={"format": "pt"})
        del state
    model = load_model(checkpoint, mode, tune=False)
    gc.collect()
    assert model.lm_head is not None
    assert str(checkpoint / "model.safetensors") not in Path("/proc/self/maps").read_text()
