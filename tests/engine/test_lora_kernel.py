"""The compiled per-row LoRA op (csrc/lora_rows.cpp) against its pure-torch reference, and the engine
with it against the engine without it (the masked-matmul path of layers.lora_add).

Both paths accumulate in fp32 from the same (fp32 or bf16) lanes, so they agree to fp32 rounding;
a bf16 y (rounded to bf16 by both) gets a bf16-sized tolerance. Rows without an adapter are never
touched, and a row's result never depends on the other rows: bit for bit."""
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
    return a.to(dtype), [bt.flatten(1, 2).to(dtype) for bt in bts]


def rows_of(inn: int, width: int, lanes: list[int], dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lanes), inn, generator=g).to(dtype)
    y = torch.randn(len(lanes), width, generator=g).to(dtype)
    return x, y, torch.tensor(lanes, dtype=torch.int32)


MIXED = [3, -1, 0, 5, 3, 1, -1, 2, 4, 4, 0, 5, -1]


@pytest.mark.parametrize("lane_dtype", [torch.float32, torch.bfloat16])
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


@pytest.mark.parametrize("lane_dtype", [torch.float32, torch.bfloat16])
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


def greedy(checkpoint, refs, mode):
    engine = Engine(load_model(checkpoint, mode), Tokenizer.from_pretrained(checkpoint), max_batch=8,
                    max_context=256, prefill_chunk=7).start()
    try:
        prompts = [[BOS, 10 + i, 200 + 3 * i, 77] for i in range(len(refs))]
        outs = run(engine, [req(f"r{i}", p, ref, max_tokens=12) for i, (p, ref) in enumerate(zip(prompts, refs))])
        return [ids(out) for out in outs], engine.adapters.dtype
    finally:
        engine.stop()


def scaled(ref, factor: float):
    """The adapter with A and B multiplied by `factor`, in place."""
    from safetensors.torch import load_file, save_file
    path = Path(ref.path) / "adapter_model.safetensors"
    save_file({name: w * factor for name, w in load_file(path).items()}, path)
    return ref


@pytest.mark.parametrize("mode", ["float32", "int4"])
def test_the_engine_with_the_op_answers_as_without_it(kernel, tiny_checkpoint, tmp_path, monkeypatch, mode):
    """Six rows over four adapters and the base, greedy: the same tokens with the compiled op (bf16
    lanes beside int4 weights, fp32 lanes in float32) as with the masked matmuls (fp32 lanes).

    The adapters are scaled to std 0.06 (trained LoRA weights are this small or smaller): at
    test_lora's 0.3 the update dwarfs the tiny base, and bf16's rounding of the lanes (2^-9
    relative) flips a near tie by the 12th token in int4 mode; fp32 lanes agree either way."""
    import amber.engine.lora as lora
    model = load_model(tiny_checkpoint)
    many = [scaled(write_adapter(model, tmp_path / str(i), i, (4, 8, 16)[i % 3]), 0.2) for i in range(4)]
    refs = [many[0], None, many[1], many[2], many[3], many[0]]
    with_op, dtype = greedy(tiny_checkpoint, refs, mode)
    assert dtype == (torch.bfloat16 if mode == "int4" else torch.float32)
    monkeypatch.setattr(lora, "use_kernel", lambda device: False)
    without, dtype = greedy(tiny_checkpoint, refs, mode)
    assert dtype == torch.float32
    assert with_op == without
