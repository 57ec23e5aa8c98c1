"""Kernels chosen per CPU (engine/kernels.py): the choice follows the timings, only the chosen copy
of the weights is kept, every path computes the same product, and a machine measures once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amber.engine import kernels
from amber.engine.kernels import UNLIMITED, Choice, choose
from amber.engine.loader import load_model
from amber.engine.quantize import Int4Linear, Int8Linear, QuantizedLinear

ROWS = (1, 2, 4, 8, 16, 64, 256)


def test_a_fused_kernel_that_wins_everywhere_keeps_no_dense_copy():
    times = {"fused": [1.0] * 7, "bf16": [2.0] * 7, "fp32": [3.0] * 7}
    assert choose(ROWS, times) == Choice(UNLIMITED, None)


def test_without_fast_bf16_the_fp32_copy_takes_the_batches():
    # a Xeon without AVX-512 BF16: bf16 GEMMs ~3x slower than fp32, the int4 kernel best to 8 rows
    fused = [0.05, 0.06, 0.08, 0.12, 0.40, 1.6, 6.4]
    fp32 = [0.30, 0.30, 0.31, 0.32, 0.34, 0.6, 2.0]
    bf16 = [3 * t for t in fp32]
    assert choose(ROWS, {"fused": fused, "bf16": bf16, "fp32": fp32}) == Choice(8, "fp32")


def test_with_fast_bf16_the_bf16_copy_wins_and_a_tie_goes_to_the_smaller_copy():
    fused = [0.05, 0.06, 0.08, 0.30, 0.60, 1.6, 6.4]
    bf16 = [0.20, 0.20, 0.20, 0.21, 0.22, 0.3, 0.8]
    assert choose(ROWS, {"fused": fused, "bf16": bf16, "fp32": [2 * t for t in bf16]}) == Choice(4, "bf16")
    # fp32 a hair (1%) faster than bf16 everywhere: within the tie, so the copy half the size wins
    assert choose(ROWS, {"fused": fused, "bf16": bf16, "fp32": [0.99 * t for t in bf16]}) == Choice(4, "bf16")
    # ... and a fused kernel 1% slower than the copies everywhere is a tie won by keeping no copy
    close = {"fused": [0.05] * 7, "bf16": [0.0495] * 7, "fp32": [0.0495] * 7}
    assert choose(ROWS, close) == Choice(UNLIMITED, None)


def q4_layer(out_features=96, in_features=128) -> Int4Linear:
    torch.manual_seed(0)
    return Int4Linear(torch.randn(out_features, in_features) * 0.05)


MADE = [Choice(2, "bf16", made=True), Choice(0, "fp32", made=True)]  # widened per product: Amber's kernels


@pytest.mark.parametrize("choice", [Choice(UNLIMITED, None), Choice(2, "bf16"), Choice(2, "fp32"), Choice(0, "fp32"),
                                    *MADE])
@pytest.mark.parametrize("make", [q4_layer, lambda: Int8Linear(torch.randn(96, 128) * 0.05)])
def test_every_path_computes_the_same_product_and_keeps_only_its_copy(make, choice):
    layer = make()
    if choice.made and not layer.makes_dense:
        pytest.skip("torch's kernels keep their dense copies")
    reference_weights = layer.dense_weights().float().clone()
    layer.use(choice)
    if choice.dense is None or choice.made:
        assert layer.dense is None
    else:
        assert layer.dense.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[choice.dense]
        assert torch.equal(layer.dense.float(), reference_weights)  # the same values, whatever the dtype
    x = torch.randn(8, layer.in_features)
    with torch.inference_mode():
        reference = x @ reference_weights.T
        for rows in (1, 2, 3, 8):
            out = layer(x[:rows])
            # fp32 inputs to an fp32 copy keep fp32; every other path rounds to bf16
            expected_dtype = torch.float32 if choice.dense == "fp32" and rows > choice.fused_max_rows else torch.bfloat16
            assert out.dtype == expected_dtype
            torch.testing.assert_close(out.float(), reference[:rows], atol=0.02, rtol=0.02)
        # bf16 activations (int8-bf16) stay bf16 whichever copy multiplies them
        assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_a_dropped_copy_is_recovered_exactly_from_the_packed_weights():
    layer = q4_layer()
    kept = layer.dense_weights().clone()
    layer.use(Choice(UNLIMITED, None))
    assert torch.equal(layer.dense_weights(), kept)
    layer.use(Choice(4, "bf16"))
    assert torch.equal(layer.dense, kept)


def test_tuning_the_real_model_applies_one_choice_per_shape_and_caches_it(default_checkpoint, tmp_path, monkeypatch):
    model = load_model(default_checkpoint, "int4", tune=False)
    groups = kernels.quantized_layers(model)
    # SmolLM2-135M: the four block projections (int4) and the LM head (int8)
    assert len(groups) == 5 and sum(len(v) for v in groups.values()) == 4 * 30 + 1
    monkeypatch.setattr(kernels, "_memory", {})
    # the row counts timed: fewer than a server's, with its smallest and largest (the choice's
    # plumbing is under test here, not which path this CPU prefers)
    monkeypatch.setattr(kernels, "ROWS", (1, 8, kernels.ROWS[-1]))
    monkeypatch.setattr(kernels, "HEAD_ROWS", (1, 8, kernels.HEAD_ROWS[-1]))
    choices = kernels.tune(model, tmp_path)
    assert set(choices) == set(groups) and model.kernels == choices
    for shape, layers in groups.items():
        for layer in layers:
            assert layer.fused_max_rows == choices[shape].fused_max_rows
            assert (layer.dense is None) == (choices[shape].dense is None or choices[shape].made)
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["machine"]["torch"] == torch.__version__ and saved["machine"]["cpu"]
    for shape in groups:
        entry = saved["shapes"][shape]
        assert set(entry["ms"]) == {"fused", "bf16", "fp32"}
        assert all(len(v) == len(entry["rows"]) and min(v) > 0 for v in entry["ms"].values())
        assert Choice(**entry["choice"]) == choose(tuple(entry["rows"]), entry["ms"], made=groups[shape][0].makes_dense)
    # a second server on this machine (a new process: nothing in memory) measures nothing
    monkeypatch.setattr(kernels, "_memory", {})
    monkeypatch.setattr(kernels, "measure", lambda *a: pytest.fail("measured again despite the cache"))
    again = load_model(default_checkpoint, "int4", kernel_cache=tmp_path)
    assert again.kernels == choices
    # another CPU, or another torch, is another key: measured afresh
    monkeypatch.setattr(kernels, "machine", lambda: {**saved["machine"], "flags": "sse2"})
    with pytest.raises(pytest.fail.Exception):
        kernels.tune(again, tmp_path)


def test_every_path_is_timed_at_least_twice_however_slow_a_pass(tiny_checkpoint, monkeypatch):
    """A pass over the layers longer than the budget (a prefill-sized row count) still gets a
    second, so one noisy sample never decides which path a machine keeps for good."""
    layers = next(iter(kernels.quantized_layers(load_model(tiny_checkpoint, "int4", tune=False)).values()))
    monkeypatch.setattr(kernels, "BUDGET_S", 0.0)
    calls = {"n": 0}
    fused = type(layers[0]).fused

    def counted(self, rows):
        calls["n"] += 1
        return fused(self, rows)
    monkeypatch.setattr(type(layers[0]), "fused", counted)
    times = kernels.measure(layers, torch.float32, (1, 256))
    assert all(len(v) == 2 for v in times.values())
    # per row count: one warm-up call, then two passes over every layer
    assert calls["n"] == 2 * (1 + 2 * len(layers))


def test_models_without_quantized_layers_have_nothing_to_choose(tiny_checkpoint):
    assert load_model(tiny_checkpoint, "bfloat16").kernels == {}
    model = load_model(tiny_checkpoint, "int4")
    assert model.kernels and all(isinstance(c, Choice) for c in model.kernels.values())
    assert all(isinstance(m, QuantizedLinear) for group in kernels.quantized_layers(model).values() for m in group)


def test_amber_doctor_shows_the_cpu_and_the_choice(tiny_checkpoint, tmp_path):
    (tmp_path / "models.toml").write_text(f'default = "tiny"\n[models.tiny]\npath = "{tiny_checkpoint}"\n'
                                          'dtype = "int4"\n')
    env = {**os.environ, "AMBER_HOME": str(tmp_path)}
    env.pop("AMBER_KERNELS", None)  # this home's own cache
    amber = Path(sys.executable).parent / "amber"
    out = subprocess.run([amber, "doctor"], env=env, capture_output=True, text=True, check=True).stdout
    assert "CPU" in out and torch.__version__ in out and "int4/g32" in out and "fused ms" in out
    assert len(list((tmp_path / "kernels").glob("*.json"))) == 1
    missing = subprocess.run([amber, "doctor", "--model", "nope"], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "nope" in missing.stderr
