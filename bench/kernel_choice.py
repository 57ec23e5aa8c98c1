"""What choosing kernels per CPU buys: the default precision with the kernels engine/kernels.py
measured on this CPU, against the fixed rule Amber had before (the fused kernel up to 8 rows for
int4 and 4 for int8, a bf16 copy above), in one run, in turns.

    .venv/bin/python bench/kernel_choice.py [--rounds 3]

In-process (no HTTP): one sequence x 128 tokens, 16 sequences x 128 tokens decoded together
(aggregate tokens/s), and a 1,000-token prefill. Writes bench/results/kernel_choice/KIND.json and
the kernel-choice section of docs/benchmarks.md (every CPU kind measured, side by side).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cpu_kind, machine, update_doc_section  # noqa: E402

from amber.config import DEFAULT_MODEL, load_registry  # noqa: E402
from amber.engine.checkpoint import ensure_checkpoint  # noqa: E402
from amber.engine.engine import Engine  # noqa: E402
from amber.engine.kernels import Choice  # noqa: E402
from amber.engine.loader import load_model  # noqa: E402
from amber.engine.quantize import Int4Linear, QuantizedLinear  # noqa: E402
from amber.engine.tokenizer import Tokenizer  # noqa: E402
from amber.engine.types import GenerationRequest, SamplingParams  # noqa: E402

HOME = REPO / ".amber-bench"
RESULTS = REPO / "bench/results/kernel_choice"
TEXT = (REPO / "tests/data/sst2/dev.jsonl").read_text()


def fixed(model) -> None:
    """The rule before kernels were measured: int4 kernel to 8 rows, int8 to 4, then bf16."""
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear) and layer.has_fused_kernel():
            layer.use(Choice(8 if isinstance(layer, Int4Linear) else 4, "bf16"))


def generate(engine: Engine, prompts: list[list[int]], tokens: int) -> float:
    """Seconds until every prompt has `tokens` greedy tokens (submitted together)."""
    done, left = threading.Event(), [len(prompts)]
    lock = threading.Lock()

    def finished(_):
        with lock:
            left[0] -= 1
            if not left[0]:
                done.set()
    began = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.submit(GenerationRequest(f"{time.perf_counter_ns()}-{i}", tuple(prompt),
                                        SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens)),
                      finished)
    done.wait()
    return time.perf_counter() - began


def measure(checkpoint: Path, dtype: str, ids: list[int], policy: str) -> dict:
    def build():
        model = load_model(checkpoint, dtype, kernel_cache=HOME / "kernels")
        if policy == "fixed":
            fixed(model)
        return model, Tokenizer.from_pretrained(checkpoint)
    engine = Engine.launch(build, max_batch=16, prefix_blocks=0)
    try:
        short = [ids[i * 40:i * 40 + 30] for i in range(16)]
        generate(engine, short[:2], 8)  # warm-up
        one = generate(engine, short[:1], 129) - generate(engine, short[:1], 1)
        sixteen = generate(engine, short, 129) - generate(engine, short, 1)
        prefill = generate(engine, [ids[:1000]], 1)
        return {"decode_tps": 128 / one, "batch16_tps": 16 * 128 / sixteen, "prefill_tps": 1000 / prefill}
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--render", action="store_true", help="only redraw the docs from the results files")
    args = parser.parse_args()
    if not args.render:
        torch.set_num_threads(2)
        HOME.mkdir(exist_ok=True)
        spec = load_registry(HOME / "models.toml").models[DEFAULT_MODEL]
        checkpoint = ensure_checkpoint(spec, HOME / "checkpoints")
        ids = Tokenizer.from_pretrained(checkpoint).encode(TEXT)
        rows: dict[str, list[dict]] = {"measured": [], "fixed": []}
        for _ in range(args.rounds):
            for policy in rows:
                rows[policy].append(measure(checkpoint, spec.dtype, ids, policy))
        result = {"date": time.strftime("%Y-%m-%d"), "dtype": spec.dtype,
                  **{policy: {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"rounds": runs}
                     for policy, runs in rows.items()}}
        probe = load_model(checkpoint, spec.dtype, kernel_cache=HOME / "kernels")
        chosen = {shape: c.describe() for shape, c in probe.kernels.items()}
        result = {"machine": machine({DEFAULT_MODEL: chosen}), **result}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{cpu_kind(result['machine'])}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("measured", "fixed")}, indent=1))
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    update_doc_section("kernel-choice", render(runs))


def render(runs: list[dict]) -> str:
    lines = ["| CPU kind | kernels | 1 sequence tok/s | 16 sequences tok/s | prefill tok/s (1,000) |",
             "|---|---|---|---|---|"]
    for r in runs:
        kind = cpu_kind(r["machine"])
        for policy, label in (("fixed", "fixed rule (before)"), ("measured", "measured here")):
            row = r[policy]
            lines.append(f"| {kind} ({r['date']}) | {label} | {row['decode_tps']:.1f} | {row['batch16_tps']:.1f} | "
                         f"{row['prefill_tps']:.0f} |")
        m, f = r["measured"], r["fixed"]
        lines.append(f"| | ratio | {m['decode_tps'] / f['decode_tps']:.2f}x | {m['batch16_tps'] / f['batch16_tps']:.2f}x | "
                     f"{m['prefill_tps'] / f['prefill_tps']:.2f}x |")
    for r in runs:
        chosen = next(iter(r["machine"]["amber_kernels"].values()), {})
        lines += ["", f"{cpu_kind(r['machine'])}: " + "; ".join(f"`{s.split(' in:')[0]}` {p}" for s, p in chosen.items())]
        if r["machine"].get("isa_limits"):
            lines.append("(the same CPU with " + ", ".join(f"{k}={v}" for k, v in r["machine"]["isa_limits"].items())
                         + ": oneDNN's GEMMs without fast bf16, an emulation of a CPU that lacks it)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
