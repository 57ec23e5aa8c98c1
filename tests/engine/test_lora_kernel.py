"""The compiled per-row LoRA op (csrc/lora_rows.cpp) against its pure-torch reference, and the engine
with it against the engine without it (the masked-matmul path of layers.lora_add).

Both paths accumulate in fp32 from the same (fp32, bf16 or int8 with a scale per row) lanes, so they
agree to fp32 rounding; a bf16 y (rounded to bf16 by both) gets a bf16-sized tolerance. Rows without
an adapter are never touched, and a row's result never depends on the other rows: bit for bit."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from amber.engine import paged_ops
from amber.engine.engine import Engine
from amber.engine.loader import load_model
from amber.engine.tokenizer import Tokenizer
from tests.engine.test_lora import ids, req, write_adapter
from tests.engine.test_engine import BOS, run

R, LANES, LAYERS = 16, 6, 3
SHAPES = [(64, [64, 32, 32]), (40, [72]), (96, [48, 48])]  # (in, out per part): fused, plain, odd widths


def lanes_of(inn: int, sizes: list[int], dtype: torch.dtype, seed: int = 0):
    """Random lanes; lane l has rank 4 * (l % 4 + 1), zeros past it (lanes padded to R)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(LAYERS, len(sizes), LANES, R, inn, generator=g)
    bts = [torch.randn(LAYERS, LANES, R, size, generator=g) for size in sizes]
    for lane in range(LANES):
        rank = 4 * (lane % 4 + 1)
        a[:, :, lane, rank:] = 0
        for bt in bts:
            bt[:, lane, rank:] = 0
    return paged_ops.to_lanes(a, dtype), [paged_ops.to_lanes(bt.flatten(1, 2), dtype) for bt in bts]


def rows_of(inn: int, width: int, lanes: list[int], dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lanes), inn, generator=g).to(dtype)
    y = torch.randn(len(lanes), width, generator=g).to(dtype)
    return x, y, torch.tensor(lanes, dtype=torch.int32)


MIXED = [3, -1, 0, 5, 3, 1, -1, 2, 4, 4, 0, 5, -1]


@pytest.mark.parametrize("lane_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_op_equals_the_reference_and_leaves_rows_without_adapter_alone(kernel, lane_dtype, act_dtype, shape):
    inn, sizes = shape
    a, bts = lanes_of(inn, sizes, lane_dtype)
    x, y, lanes = rows_of(inn, sum(sizes), MIXED, act_dtype)
    for layer in range(LAYERS):
        got, want = y.clone(), y.clone()
        torch.ops.amber.lora_rows(got, x, a[layer], bts, layer, lanes)
        paged_ops.lora_rows_reference(want, x, a[layer], bts, layer, lanes)
        none = lanes < 0
        assert torch.equal(got[none], y[none])
        assert not torch.equal(got[~none], y[~none])
        tol = 1e-5 if act_dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("lane_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_a_batch_equals_each_row_alone_and_one_thread_bit_for_bit(kernel, lane_dtype):
    inn, sizes = SHAPES[0]
    a, bts = lanes_of(inn, sizes, lane_dtype)
    x, y, lanes = rows_of(inn, sum(sizes), MIXED, torch.float32)
    batch = y.clone()
    torch.ops.amber.lora_rows(batch, x, a[1], bts, 1, lanes)
    for row in range(len(MIXED)):
        alone = y[row:row + 1].clone()
        torch.ops.amber.lora_rows(alone, x[row:row + 1], a[1], bts, 1, lanes[row:row + 1])
        assert torch.equal(alone[0], batch[row])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = y.clone()
        torch.ops.amber.lora_rows(one, x, a[1], bts, 1, lanes)
        assert torch.equal(one, batch)
    finally:
        torch.set_num_threads(threads)


def test_callable_from_torchscript_and_checks_its_arguments(kernel):
    @torch.jit.script
    def add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bts: list[torch.Tensor], layer: int,
            lanes: torch.Tensor) -> torch.Tensor:
        torch.ops.amber.lora_rows(y, x, a, bts, layer, lanes)
        return y

    inn, sizes = SHAPES[0]
    a, bts = lanes_of(inn, sizes, torch.bfloat16)
    x, y, lanes = rows_of(inn, sum(sizes), MIXED, torch.float32)
    want = y.clone()
    torch.ops.amber.lora_rows(want, x, a[0], bts, 0, lanes)
    assert torch.equal(add(y.clone(), x, a[0], bts, 0, lanes), want)
    with pytest.raises(RuntimeError, match="is not a lane"):
        torch.ops.amber.lora_rows(y.clone(), x, a[0], bts, 0, torch.full_like(lanes, LANES))


def test_int8_lanes_are_each_row_rounded_to_its_own_scale():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(5, 7, 40, generator=g) * torch.rand(5, 7, 1, generator=g)
    rows[1, 2] = 0
    lanes = paged_ops.to_lanes(rows, torch.int8)
    assert lanes.shape == (5, 7, 44) and lanes.dtype == torch.int8
    scale = lanes[..., 40:].contiguous().view(torch.float32)
    torch.testing.assert_close(scale, rows.abs().amax(-1, keepdim=True) / 127, rtol=0, atol=0)
    assert lanes[..., :40].abs().max() == 127 and scale[1, 2] == 0
    back = paged_ops.from_lanes(lanes)
    assert torch.equal(back[1, 2], torch.zeros(40))
    assert ((back - rows).abs() <= scale / 2 * (1 + 1e-6)).all()   # round to nearest: half a step at most
    assert torch.equal(paged_ops.from_lanes(paged_ops.to_lanes(rows, torch.bfloat16)), rows.bfloat16().float())


def test_int8_lanes_change_an_update_by_about_a_percent(kernel):
    """The price of int8 lanes (the default beside quantized base weights): the update differs from
    fp32 lanes' by ~0.5% of its size (each value off by at most half a step, 1/254 of its row's
    largest), where bf16 lanes differ by ~0.2%."""
    inn, sizes = SHAPES[0]
    x, y, lanes = rows_of(inn, sum(sizes), MIXED, torch.float32)
    exact = y.clone()
    a32, bts32 = lanes_of(inn, sizes, torch.float32)
    torch.ops.amber.lora_rows(exact, x, a32[1], bts32, 1, lanes)
    errors = {}
    for dtype in (torch.bfloat16, torch.int8):
        a, bts = lanes_of(inn, sizes, dtype)
        got = y.clone()
        torch.ops.amber.lora_rows(got, x, a[1], bts, 1, lanes)
        errors[dtype] = ((got - exact).norm() / (exact - y).norm()).item()
    assert errors[torch.bfloat16] < 4e-3 and errors[torch.int8] < 1.5e-2, errors


def greedy(checkpoint, refs, mode, score: bool = False):
    """Each request's 12 greedy tokens, and the engine's lane dtype; score: instead the logprobs of
    a 16-token prompt."""
    engine = Engine(load_model(checkpoint, mode), Tokenizer.from_pretrained(checkpoint), max_batch=8,
                    max_context=256, prefill_chunk=7).start()
    try:
        # every adapter read in first: requests whose adapter is still loading wait while the others
        # run, and in int4 a row's arithmetic depends on how many rows share its step
        run(engine, [req(f"w{i}", [BOS, 5], ref, max_tokens=1) for i, ref in enumerate(refs) if ref])
        if score:
            prompts = [[BOS, *(10 + (37 * i + 11 * k) % 400 for k in range(15))] for i in range(len(refs))]
            outs = run(engine, [req(f"r{i}", p, ref, max_tokens=1) for i, (p, ref) in enumerate(zip(prompts, refs))])
            return [[t.logprob for t in out.prompt] for out in outs], engine.adapters.dtype
        prompts = [[BOS, 10 + i, 200 + 3 * i, 77] for i in range(len(refs))]
        outs = run(engine, [req(f"r{i}", p, ref, max_tokens=12) for i, (p, ref) in enumerate(zip(prompts, refs))])
        return [ids(out) for out in outs], engine.adapters.dtype
    finally:
        engine.stop()


def lanes_in(monkeypatch, dtype: torch.dtype) -> None:
    """Engines made from now on keep their adapter lanes in `dtype`."""
    import amber.engine.lora as lora
    init = lora.AdapterSlots.__init__
    monkeypatch.setattr(lora.AdapterSlots, "__init__",
                        lambda self, model, capacity, resident=128, dtype_=None: init(self, model, capacity, resident,
                                                                                     dtype))


def scaled(ref, factor: float):
    """The adapter with A and B multiplied by `factor`, in place."""
    from safetensors.torch import load_file, save_file
    path = Path(ref.path) / "adapter_model.safetensors"
    save_file({name: w * factor for name, w in load_file(path).items()}, path)
    return ref


@pytest.mark.parametrize("mode", ["float32", "int4"])
def test_the_engine_with_the_op_answers_as_without_it(kernel, tiny_checkpoint, tmp_path, monkeypatch, mode):
    """Six rows over four adapters and the base: the compiled op against the masked matmuls, both
    from fp32 lanes (the op's own lanes beside int4 weights, int8, are the next test's). float32:
    the same greedy tokens. int4: the same logprobs of a scored prompt to bf16's rounding, 1.5%:
    int4's prefill runs in bf16, and the op adds each update to y in the activations' dtype where
    the masked matmuls add it in the lanes' (fp32). Measured: 0.76% at most, on -13 to -46 (this
    tiny model's logits are scaled up 40x), where an adapter moves them by several units; the
    rounding flipped a near tie of int4's greedy tokens on the plain-loop build.

    The adapters are scaled to std 0.06 (trained LoRA weights are this small or smaller): at
    test_lora's 0.3 the update dwarfs the tiny base."""
    import amber.engine.lora as lora
    model = load_model(tiny_checkpoint)
    many = [scaled(write_adapter(model, tmp_path / str(i), i, (4, 8, 16)[i % 3]), 0.2) for i in range(4)]
    refs = [many[0], None, many[1], many[2], many[3], many[0]]
    score = mode == "int4"
    lanes_in(monkeypatch, torch.float32)
    with_op, dtype = greedy(tiny_checkpoint, refs, mode, score)
    assert dtype == torch.float32
    monkeypatch.setattr(lora, "use_kernel", lambda device: False)
    without, dtype = greedy(tiny_checkpoint, refs, mode, score)
    assert dtype == torch.float32
    if score:
        for a, b in zip(with_op, without):
            assert a == pytest.approx(b, rel=0.015)
    else:
        assert with_op == without


def test_int8_lanes_beside_int4_weights_score_as_fp32_lanes_do_to_their_rounding(kernel, tiny_checkpoint, tmp_path,
                                                                               monkeypatch):
    """The engine's default lanes beside int4 weights are int8 (a scale per row). Scoring the same
    tokens, their logprobs stay within a bound of fp32 lanes': this tiny random model's logprobs are
    -13 to -46 (its logits are scaled up 40x), and int8 lanes moved them by at most 0.23 (1.0%),
    0.08 on average, where bf16 lanes moved them by at most 0.16 (0.6%), 0.04 on average (measured
    on AVX-512 and on the plain loops)."""
    model = load_model(tiny_checkpoint)
    many = [scaled(write_adapter(model, tmp_path / str(i), i, (4, 8, 16)[i % 3]), 0.2) for i in range(3)]
    refs = [many[0], None, many[1], many[2]]
    int8, dtype = greedy(tiny_checkpoint, refs, "int4", score=True)
    assert dtype == torch.int8
    lanes_in(monkeypatch, torch.float32)
    fp32, _ = greedy(tiny_checkpoint, refs, "int4", score=True)
    pairs = [(a, b) for row in (0, 2, 3) for a, b in zip(int8[row], fp32[row])]
    assert int8 != fp32, "the lanes' rounding changed nothing: the adapters were not applied"
    assert max(abs(a - b) / abs(b) for a, b in pairs) < 0.02, pairs
    assert sum(abs(a - b) for a, b in pairs) / len(pairs) < 0.2, pairs
