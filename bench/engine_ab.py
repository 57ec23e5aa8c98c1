"""Amber's engine against itself at another git revision, in turns, in one run: did a change keep
the speed? The peer is Amber's own code at `--base` (checked out into a temporary worktree).

    .venv/bin/python bench/engine_ab.py --base 65e7265 [--rounds 4]

Each round runs each side in a fresh process (one after the other, never together, so the machine's
drift falls on both alike), on the default model in its registry precision with 2 threads:
single-stream decode (128 tokens after a 30-token prompt), prefill of a 1,000-token prompt (no
prefix cache), and 16 concurrent requests x 64 tokens (aggregate tokens/s). Reports each side's
median over rounds and the ratio this tree / base. Writes bench/results/engine_ab/KIND.json and
the `engine-ab` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cpu_kind, machine, update_doc_section  # noqa: E402

RESULTS = REPO / "bench/results/engine_ab"
HOME = REPO / ".amber-bench"

# Runs inside each side's tree (PYTHONPATH): only calls both revisions have.
MEASURE = r'''
import json, statistics, sys, threading, time
from pathlib import Path
import torch
torch.set_num_threads(2)
from amber.engine.engine import Engine
from amber.engine.loader import load_model
from amber.engine.tokenizer import Tokenizer
from amber.engine.types import GenerationRequest, SamplingParams
checkpoint, kernels, text = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]).read_text()
build = lambda: (load_model(checkpoint, "int4", kernel_cache=kernels), Tokenizer.from_pretrained(checkpoint))
engine = Engine.launch(build, max_batch=16, prefix_blocks=0)
ids = engine.tokenizer.encode(text)

def go(prompts, **params):
    done, left = threading.Event(), [len(prompts)]
    def finished(out):
        left[0] -= 1
        if not left[0]:
            done.set()
    began = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(f"{time.perf_counter_ns()}-{i}", tuple(p),
                                        SamplingParams(temperature=0.0, **params)), finished)
    done.wait()
    return time.perf_counter() - began

go([ids[:50]], max_tokens=8)
short = ids[:30]
ttft = statistics.median(go([short], max_tokens=1) for _ in range(3))
decode = statistics.median(go([short], max_tokens=129, min_tokens=129) for _ in range(3))
prefill = statistics.median(go([ids[:1000]], max_tokens=1) for _ in range(3))
burst = statistics.median(go([ids[i * 40:i * 40 + 30] for i in range(16)], max_tokens=64, min_tokens=64)
                          for _ in range(2))
engine.stop()
print(json.dumps({"decode_tps": 128 / (decode - ttft), "prefill_tps": 1000 / prefill,
                  "concurrent16_tps": 16 * 64 / burst}))
'''


def side(tree: Path, checkpoint: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(checkpoint), str(HOME / "kernels"),
                          str(REPO / "tests/data/sst2/dev.jsonl")], env=env, capture_output=True, text=True,
                         check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    from amber.config import DEFAULT_MODEL, DEFAULT_REGISTRY, parse_registry
    from amber.engine.checkpoint import ensure_checkpoint
    checkpoint = ensure_checkpoint(parse_registry(DEFAULT_REGISTRY).models[DEFAULT_MODEL], HOME / "checkpoints")
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    rows: dict[str, list[dict]] = {"this tree": [], "base": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), base_rev], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for _ in range(args.rounds):
                rows["this tree"].append(side(REPO, checkpoint))
                rows["base"].append(side(base, checkpoint))
                print(rows["this tree"][-1], rows["base"][-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    keys = ("decode_tps", "prefill_tps", "concurrent16_tps")
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in rows.items()}
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "base": base_rev, "head": head_rev,
              "medians": medians, "rounds": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{cpu_kind(result['machine'])}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    update_doc_section("engine-ab", render(result))
    print(render(result))


def render(r: dict) -> str:
    m, (a, b) = r["machine"], (r["medians"]["this tree"], r["medians"]["base"])
    labels = {"decode_tps": "single-stream decode (tok/s)", "prefill_tps": "prefill, 1,000 tokens (tok/s)",
              "concurrent16_tps": "16 concurrent x 64 tokens (tok/s)"}
    lines = [f"{m['cpu']}, {m['cores']} cores; {len(r['rounds']['base'])} rounds in turns; "
             f"this tree {r['head']} (plus uncommitted changes, if any) against {r['base']}.", "",
             f"| measure | this tree | base {r['base']} | ratio |", "|---|---|---|---|"]
    lines += [f"| {labels[k]} | {a[k]:.1f} | {b[k]:.1f} | {a[k] / b[k]:.2f}x |" for k in labels]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
