"""Every precision mode: the batched engine still equals the slow loop on the same weights, int8
matrices are what they claim, and the real model stays close to fp32."""
from __future__ import annotations

import threading

import pytest
import torch

from amber.engine.engine import Engine
from amber.engine.kv_cache import KVCache
from amber.engine.loader import load_model
from amber.engine.quantize import FUSED_INT8_MAX_ROWS, Int8Linear
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import GenerationRequest, SamplingParams

MODES = ["float32", "bfloat16", "int8", "int8-bf16"]


def run(engine, requests):
    results, done = {}, threading.Event()
    for r in requests:
        engine.submit(r, lambda out, rid=r.request_id: (results.__setitem__(rid, out),
                                                         len(results) == len(requests) and done.set()))
    assert done.wait(120)
    return [results[r.request_id] for r in requests]


@torch.inference_mode()
def slow_greedy(model, prompt, steps):
    """Recompute the whole sequence for every token, in a fresh cache: no reuse of any kind."""
    cfg, seq, out = model.config, [1, *prompt], []
    for _ in range(steps):
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, len(seq), cfg.head_dim,
                        model.kv_dtype or model.model.embed_tokens.weight.dtype)
        hidden = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), cache, slice(0, 1))
        logprobs = model.logits(hidden[0, -1]).log_softmax(-1)
        token = int(logprobs.argmax())
        out.append((token, float(logprobs[token])))
        seq.append(token)
    return out


@pytest.mark.parametrize("mode", MODES)
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
    # int8: the one-row decode kernel rounds its inputs and outputs to bf16, the many-row path
    # multiplies the same int8 weights as bf16; the two differ by bf16 noise
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_per_channel_symmetric_and_both_paths_agree(dtype):
    torch.manual_seed(0)
    weight = (torch.randn(96, 64) * torch.linspace(0.01, 3, 96).unsqueeze(1)).to(dtype)
    q = Int8Linear(weight)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    error = (q.dequantized().float() - weight.float()).abs().amax(dim=1)
    assert torch.all(error <= q.scales.float() * 0.5 + 1e-2 * weight.float().abs().amax(dim=1))
    with torch.inference_mode():
        x = torch.randn(FUSED_INT8_MAX_ROWS * 2, 64).to(dtype)
        fused = torch.cat([q(x[i:i + 1]) for i in range(len(x))])   # one row: the int8 kernel
        dense = q(x)                                                # many rows: dequantized GEMM
        # matmul inputs go in as bf16 in both paths; outputs reach ~25, where bf16 rounding is ~0.1
        torch.testing.assert_close(fused.float(), dense.float(), atol=0.25, rtol=0.02)
        torch.testing.assert_close(dense.float(), (x.float() @ weight.float().T), atol=0.5, rtol=0.05)


@pytest.mark.slow
def test_real_model_precision_modes_stay_close_to_fp32(default_checkpoint):
    text = open(default_checkpoint.parents[2] / "tests/data/sst2/dev.jsonl").read()[:3000]
    ids = [1, *Tokenizer.from_pretrained(default_checkpoint).encode(text)][:500]
    scores = {}
    for mode in MODES:
        model = load_model(default_checkpoint, mode)
        cfg = model.config
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, len(ids), cfg.head_dim,
                        model.kv_dtype or model.model.embed_tokens.weight.dtype)
        with torch.inference_mode():
            lp = model.logits(model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, slice(0, 1))[0])
        scores[mode] = lp.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    dev = {m: float((scores[m] - scores["float32"]).abs().mean()) for m in MODES}
    print("mean |logprob - fp32|:", dev)
    assert dev["bfloat16"] < 0.05 and dev["int8"] < 0.05
    assert dev["int8-bf16"] < 0.1
