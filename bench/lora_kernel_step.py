"""The decode step of 16 rows over 16 different rank-16 adapters (every projection) against 16 base
rows, on SmolLM2-135M int4, in process: the compiled per-row LoRA op (bf16 lanes) and torch's masked
matmuls (fp32 lanes), timed interleaved (the machine may be shared), medians.

    PYTHONPATH=. .venv/bin/python bench/lora_kernel_step.py [--threads 1] [--rounds 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
CHECKPOINT = REPO / ".amber-bench/checkpoints/smollm2-135m-instruct"
KERNELS = REPO / ".amber-bench/kernels"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="steps per round (the round's median)")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--kernels", default=str(KERNELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import amber.engine.lora as lora_module
    from amber.engine import paged_ops
    from amber.engine.kv_cache import KVCache
    from amber.engine.loader import load_model
    from amber.engine.lora import AdapterSlots
    from amber.engine.types import AdapterRef
    from lora_batch import decode_step, write_adapter

    print("compiled ops loaded:", paged_ops.ensure())
    rows = 16
    model = load_model(Path(args.checkpoint), "int4", kernel_cache=Path(args.kernels))
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, rows, cfg.num_key_value_heads, 64, cfg.head_dim,
                    model.kv_dtype or torch.float32)
    for slot in range(rows):  # every row decodes at position 32 (lora_batch.decode_step): its blocks first
        cache.prepare(slot, 0, 33)
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        refs = []
        for i in range(rows):
            write_adapter(model, Path(tmp) / str(i), i, 16)
            refs.append(AdapterRef(f"bench-{i}", str(Path(tmp) / str(i))))
        kernel = AdapterSlots(model, capacity=rows + 1)
        original = lora_module.use_kernel
        lora_module.use_kernel = lambda device: False
        masked = AdapterSlots(model, capacity=rows + 1)
        lora_module.use_kernel = original
        print("kernel slots:", kernel.kernel, kernel.dtype, "| masked slots:", masked.kernel, masked.dtype)
        steps = {"base": decode_step(model, cache, rows, None),
                 "masked": decode_step(model, cache, rows, masked.batch([masked.acquire(r) for r in refs], 1)),
                 "kernel": decode_step(model, cache, rows, kernel.batch([kernel.acquire(r) for r in refs], 1))}
        out = {name: steps[name]() for name in steps}  # warm up (scripting), and compare
        print("max |kernel - masked| hidden:", float((out["kernel"] - out["masked"]).abs().max()),
              " |masked - base|:", float((out["masked"] - out["base"]).abs().max()))
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                ts = []
                for _ in range(args.steps):
                    t = time.perf_counter()
                    step()
                    ts.append(time.perf_counter() - t)
                times[name].append(statistics.median(ts))
        med = {name: 1000 * statistics.median(v) for name, v in times.items()}
        print(f"threads {torch.get_num_threads()}: base {med['base']:.2f} ms, masked fp32 {med['masked']:.2f} ms "
              f"(x{med['masked'] / med['base']:.2f}), kernel bf16 {med['kernel']:.2f} ms "
              f"(x{med['kernel'] / med['base']:.2f})")
        ratios = [k / b for k, b in zip(times["kernel"], times["base"])]
        ratios_m = [k / b for k, b in zip(times["masked"], times["base"])]
        print(f"per-round ratio medians: kernel x{statistics.median(ratios):.2f}, masked x{statistics.median(ratios_m):.2f}")


if __name__ == "__main__":
    main()
