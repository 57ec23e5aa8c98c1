"""What the compiled paged decode attention op costs against the ways around it, for one layer of
SmolLM2-135M's decode step (9 query heads, 3 kv heads, head_dim 64) over a bf16 cache:

    kernel      torch.ops.amber.paged_decode_attention on a paged pool (block 16, shuffled tables)
    reference   the torch fallback: gather each row's positions, upcast, SDPA with a mask
    contiguous  SDPA on a contiguous (batch, kv_heads, context, head_dim) bf16 cache, as decode runs
                today without paging (with and without the (batch, 1, 1, context) mask it passes)

    .venv/bin/python bench/paged_attention.py [--dir KERNEL_DIR] [--threads 2 1]

Prints a table (median ms per call) per thread count and writes bench/results/paged_attention.json.
Also times one call on the smallest input from Python and from a TorchScript function: the fixed
cost of the op. On a loaded machine, timings with more than one thread are mostly the wait for a
descheduled thread at the end of each parallel region (torch's own ops show the same there).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine  # noqa: E402

from amber.engine import paged_ops  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK, CONTEXT = 9, 3, 64, 16, 628
RESULTS = REPO / "bench/results/paged_attention.json"


def median_ms(fn, budget_s: float = 2.0, least: int = 20) -> float:
    for _ in range(5):
        fn()
    times = []
    began = time.perf_counter()
    while len(times) < least or time.perf_counter() - began < budget_s:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def inputs(batch: int, context: int):
    """A paged bf16 pool holding `batch` rows of `context` positions in shuffled blocks, the same
    keys and values as a contiguous cache, q in bf16 (the cache's dtype, as today's path casts it)."""
    torch.manual_seed(0)
    per_row = math.ceil(context / BLOCK)
    tables = torch.randperm(batch * per_row).to(torch.int32).view(batch, per_row)
    keys = torch.randn(batch * per_row * BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    lengths = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    slots = (tables.long()[:, :, None] * BLOCK + torch.arange(BLOCK)).view(batch, -1)[:, :context]
    contiguous = (keys[slots].transpose(1, 2).contiguous(), values[slots].transpose(1, 2).contiguous())
    return q, keys, values, tables, lengths, contiguous


def measure(batch: int, context: int) -> dict:
    q, keys, values, tables, lengths, (k_cache, v_cache) = inputs(batch, context)
    args = (q, keys, values, tables, lengths, BLOCK, 1 / math.sqrt(HEAD_DIM), 0)
    mask = torch.ones(batch, 1, 1, context, dtype=torch.bool)
    q4 = q[:, :, None]  # (batch, heads, 1, head_dim)
    row = {"batch": batch, "context": context,
           "reference_ms": median_ms(lambda: paged_ops.paged_decode_attention_reference(*args)),
           "contiguous_sdpa_ms": median_ms(lambda: F.scaled_dot_product_attention(q4, k_cache, v_cache,
                                                                                  enable_gqa=True)),
           "contiguous_sdpa_mask_ms": median_ms(lambda: F.scaled_dot_product_attention(
               q4, k_cache, v_cache, attn_mask=mask, enable_gqa=True))}
    if paged_ops.available():
        row["kernel_ms"] = median_ms(lambda: torch.ops.amber.paged_decode_attention(*args))
    return row


def scripted(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
             lengths: torch.Tensor, block_size: int, scale: float, window: int) -> torch.Tensor:
    return torch.ops.amber.paged_decode_attention(q, keys, values, tables, lengths, block_size, scale, window)


def call_cost() -> dict:
    """Microseconds per call on one row of one position: the op's fixed cost. (A function naming
    the op can be scripted only once the library is loaded.)"""
    script = torch.jit.script(scripted)
    q, keys, values, tables, lengths, _ = inputs(1, 1)
    args = (q, keys, values, tables, lengths, BLOCK, 0.125, 0)
    return {"python_us": median_ms(lambda: torch.ops.amber.paged_decode_attention(*args), 1.0) * 1e3,
            "torchscript_us": median_ms(lambda: script(*args), 1.0) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=paged_ops.default_dir())
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    opts = parser.parse_args()
    try:
        paged_ops.build(opts.dir)
    except (FileNotFoundError, OSError) as e:
        print(f"kernel not built ({e}); timing the torch paths only")
    paged_ops.load(opts.dir)
    print(f"{'threads':>7} {'batch':>5} {'kernel':>9} {'reference':>10} {'contiguous':>11} {'contig+mask':>12}"
          "   (ms, median)")
    rows, cost = [], {}
    for threads in opts.threads:
        torch.set_num_threads(threads)
        for batch in (16, 64):
            r = {"threads": threads, **measure(batch, CONTEXT)}
            rows.append(r)
            print(f"{threads:>7} {batch:>5} {r.get('kernel_ms', float('nan')):>9.3f} {r['reference_ms']:>10.3f} "
                  f"{r['contiguous_sdpa_ms']:>11.3f} {r['contiguous_sdpa_mask_ms']:>12.3f}")
        if paged_ops.available():
            cost[threads] = call_cost()
            print(f"{threads:>7} call cost (1 row, 1 position): {cost[threads]['python_us']:.1f} us from Python, "
                  f"{cost[threads]['torchscript_us']:.1f} us from TorchScript")
    result = {"machine": machine(), "load_average": os.getloadavg(), "shape": {"heads": HEADS, "kv_heads": KV_HEADS,
              "head_dim": HEAD_DIM, "block_size": BLOCK, "pool_dtype": "bfloat16", "q_dtype": "bfloat16"},
              "rows": rows, "call_cost": cost}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
