"""The LoRA share of a decode step over many distinct adapters, in fp32 and bf16 lanes: does a bf16
lane pay for itself? Writes bench/results/lora_batch.json.

    .venv/bin/python bench/lora_batch.py [--rows 16] [--repeats 100] [--threads 1]

On SmolLM2-135M (int4, as served), with random rank-16 PEFT adapters on all 7 projections, one per
row: (1) the LoRA work alone, every `lora_add` of a step (30 layers x 4 fused targets) on random
activations, with each row's lane (mask) and, for comparison, with each row's lane gathered (bmm);
(2) whole decode steps (`forward_rows`) with the adapters and without. Medians and minimums of
per-call CPU and wall times; on a shared machine, CPU time on one thread is the steadier figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import REPO, write_results

CHECKPOINT = Path("/work/main/.amber-test/checkpoints/smollm2-135m-instruct")
KERNELS = Path("/work/main/.amber-test/kernels")
RESULTS = REPO / "bench/results/lora_batch.json"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(model, directory: Path, seed: int, rank: int, scale: float = 0.02) -> None:
    """A random PEFT adapter (PEFT's file layout and names) on every projection; `scale`: the
    entries' standard deviation."""
    from amber.engine.models import family_of
    family, g, weights = family_of(model), torch.Generator().manual_seed(seed), {}
    for i, layer in enumerate(model.model.layers):
        for target in family.lora_targets:
            module = layer.get_submodule(target)
            for part, size in zip(family.hf_parts(model.config, target),
                                  family.part_sizes(model.config, target, module.out_features)):
                stem = f"base_model.model.model.layers.{i}.{part}"
                weights[f"{stem}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * scale
                weights[f"{stem}.lora_B.weight"] = torch.randn(size, rank, generator=g) * scale
    directory.mkdir(parents=True)
    save_file(weights, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ALL_LINEAR}))


def timed(variants: dict, repeats: int) -> dict:
    """Per variant, the median and minimum of `repeats` calls in wall time and in this thread's CPU
    time, run round robin so that whatever else the machine is doing weighs on every variant alike.
    With one torch thread (the default), CPU time is the steady figure on a shared machine."""
    walls, cpus = {name: [] for name in variants}, {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            fn()
            cpus[name].append(time.thread_time() - cpu)
            walls[name].append(time.perf_counter() - wall)
    return {name: {"cpu_median_ms": _ms(statistics.median(cpus[name])), "cpu_min_ms": _ms(min(cpus[name])),
                   "wall_median_ms": _ms(statistics.median(walls[name])), "wall_min_ms": _ms(min(walls[name]))}
            for name in variants}


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def activations(model, rows: int, act: torch.dtype) -> list[tuple]:
    """(layer, target, x, y) of every lora_add of one decode step, fixed random activations."""
    from amber.engine.models import family_of
    g, calls = torch.Generator().manual_seed(0), []
    for target_index, target in enumerate(family_of(model).lora_targets):
        for layer in range(len(model.model.layers)):
            module = model.model.layers[layer].get_submodule(target)
            x = torch.randn(rows, module.in_features, generator=g).to(act)
            y = torch.randn(rows, module.out_features, generator=g).to(act)
            calls.append((layer, target_index, x, y))
    return calls


def lora_work(model, lora, rows: int, act: torch.dtype):
    """Every lora_add of one decode step, on fixed random activations."""
    calls = activations(model, rows, act)

    def step():  # y of the activations' dtype is updated in place: the timing does not mind
        for layer, t, x, y in calls:
            lora.add(layer, t, x, y)
    return step


def gathered_work(model, lora, row_lanes: list[int], rows: int, act: torch.dtype):
    """The same update per row with each row's own lane gathered (bmm over rows, no mask): rows * r
    columns of work instead of rows * lanes * r. For comparison only; the engine runs lora_add."""
    lo = min(row_lanes)
    index = torch.tensor(row_lanes) - lo
    calls = activations(model, rows, act)

    def step():
        for layer, t, x, y in calls:
            a, dtype = lora.a[t][layer], lora.a[t].dtype
            parts, kr, width = a.shape
            r = kr // (max(row_lanes) - lo + 1)
            a_rows = a.view(parts, -1, r, width)[:, index]                       # (parts, rows, r, in)
            h = (x.to(dtype)[None, :, None] @ a_rows.transpose(-1, -2))          # (parts, rows, 1, r)
            out, column = y.to(dtype), 0
            for part, bts in enumerate(lora.bt[t]):
                bt = bts[layer]
                b_rows = bt.view(-1, r, bt.shape[-1])[index]                     # (rows, r, out)
                out[:, column:column + bt.shape[-1]] += (h[part] @ b_rows)[:, 0]
                column += bt.shape[-1]
    return step


def decode_step(model, cache, rows: int, lora):
    tokens, positions = [100 + r for r in range(rows)], [32] * rows
    return lambda: model.forward_rows(tokens, positions, cache, lora)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is exact)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from amber.engine.kv_cache import KVCache
    from amber.engine.loader import load_model
    from amber.engine.lora import AdapterSlots
    from amber.engine.types import AdapterRef

    model = load_model(CHECKPOINT, "int4", kernel_cache=KERNELS)
    cfg, act = model.config, model.activation_dtype
    cache = KVCache(cfg.num_hidden_layers, args.rows, cfg.num_key_value_heads, 64, cfg.head_dim,
                    model.kv_dtype or torch.float32)
    for slot in range(args.rows):  # decode_step's rows write position 32: their blocks first
        cache.prepare(slot, 0, 33)
    result = {"model": "smollm2-135m-instruct int4", "rows": args.rows, "adapters": args.rows, "rank": 16,
              "activations": str(act).removeprefix("torch."), "threads": torch.get_num_threads()}
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        refs = []
        for i in range(args.rows):
            write_adapter(model, Path(tmp) / str(i), i, 16)
            refs.append(AdapterRef(f"bench-{i}", str(Path(tmp) / str(i))))
        work, steps = {}, {"base": decode_step(model, cache, args.rows, None)}
        for dtype in (torch.float32, torch.bfloat16):
            slots = AdapterSlots(model, capacity=args.rows + 1, dtype=dtype)
            lanes = [slots.acquire(ref) for ref in refs]
            name = str(dtype).removeprefix("torch.")
            for label, row_lanes in [("distinct", lanes), ("shared", [lanes[0]] * args.rows)]:
                lora = slots.batch(row_lanes, 1)
                work[f"{name}_{label}"] = lora_work(model, lora, args.rows, act)
                steps[f"{name}_{label}"] = decode_step(model, cache, args.rows, lora)
            if not slots.kernel:  # the masked path's lanes view (with the compiled op, each row's lane already)
                work[f"{name}_distinct_gathered"] = gathered_work(model, slots.batch(lanes, 1), lanes, args.rows, act)
            slots.close()
        result["lora_adds"] = timed(work, args.repeats)
        for name, times in result["lora_adds"].items():
            print(f"lora_add calls of one step, {name}: {times}")
        result["decode_step"] = timed(steps, max(5, args.repeats // 4))
        for name, times in result["decode_step"].items():
            print(f"decode step, {name}: {times}")
    print(write_results(RESULTS, result))


if __name__ == "__main__":
    main()
