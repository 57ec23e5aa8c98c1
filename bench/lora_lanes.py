"""What a decode step of 16 rows over 16 custom models pays for its adapters' lanes: the compiled
per-row LoRA op (`lora_rows`, int8 lanes, rank 16) over SmolLM2-135M's shapes (30 layers; qkv, o,
gate/up, down), timed per step, with every row on its own lane (16 distinct adapters: the lanes'
79 MB come from memory) and with every row on one lane (the same arithmetic, the lanes in cache);
each alone and interleaved with the int4 matmuls of the same projections (random weights), as a
decode step runs them. Modes take turns (the machine may be shared); medians of the rounds, each
the best of 3 steps. No peer: this splits Amber's own step, for docs/benchmarks.md's note on the
16-adapter ratio.

    .venv/bin/python bench/lora_lanes.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from amber.engine import paged_ops
from amber.engine.cpu import machine

LAYERS, LANES, RANK, ROWS, GROUP = 30, 16, 16, 16, 32
# (input width, the widths of the fused parts' outputs)
PROJECTIONS = [(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]), (1536, [576])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if not paged_ops.ensure():
        raise SystemExit("the compiled ops are not built: make setup")
    torch.manual_seed(0)
    layers = []
    for width, outs in PROJECTIONS:
        a = [paged_ops.to_lanes(torch.randn(len(outs), LANES, RANK, width) * 0.01, torch.int8) for _ in range(LAYERS)]
        bts = [paged_ops.to_lanes(torch.randn(LAYERS, LANES * RANK, out) * 0.01, torch.int8) for out in outs]
        weights = [paged_ops.int4_pack(torch.randint(0, 16, (sum(outs), width), dtype=torch.uint8),
                                       (torch.rand(width // GROUP, sum(outs), 2) * 0.01).to(torch.bfloat16))
                   for _ in range(LAYERS)]
        layers.append((torch.randn(ROWS, width), torch.zeros(ROWS, sum(outs)), a, bts, weights))
    distinct, same = torch.arange(ROWS, dtype=torch.int32) % LANES, torch.zeros(ROWS, dtype=torch.int32)

    def step(lanes: torch.Tensor, base: bool) -> tuple[float, float]:
        """(seconds in int4 matmuls, seconds in lora_rows) of one step"""
        matmul = lora = 0.0
        for layer in range(LAYERS):
            for x, y, a, bts, weights in layers:
                began = time.perf_counter()
                if base:
                    torch.ops.amber.int4_mm(x, weights[layer][0], weights[layer][1], GROUP, True)
                middle = time.perf_counter()
                torch.ops.amber.lora_rows(y, x, a[layer], bts, layer, lanes)
                matmul, lora = matmul + middle - began, lora + time.perf_counter() - middle
        return matmul, lora

    modes = {"16 distinct lanes, alone": (distinct, False), "one lane, alone": (same, False),
             "16 distinct lanes, after each int4 matmul": (distinct, True),
             "one lane, after each int4 matmul": (same, True)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    for mode in modes.values():
        step(*mode)
    for _ in range(args.rounds):
        for name, mode in modes.items():
            times[name].append(min((step(*mode) for _ in range(3)), key=sum))
    info = machine()
    lane_bytes = sum(t.numel() * t.element_size() for _, _, a, bts, _ in layers for t in [*a, *bts])
    print(f"CPU: {info['cpu']}; {torch.get_num_threads()} threads; lanes read a step: {lane_bytes / 1e6:.0f} MB")
    for name, runs in times.items():
        matmul, lora = (1e3 * statistics.median(r[i] for r in runs) for i in (0, 1))
        print(f"{name:45s} lora_rows {lora:5.2f} ms" + (f"  (int4 matmuls {matmul:5.2f} ms)" if modes[name][1] else ""))


if __name__ == "__main__":
    main()
