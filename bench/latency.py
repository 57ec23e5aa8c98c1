"""Start-up times and single-request latency, Amber beside transformers `generate` in one run.

    .venv/bin/python bench/latency.py [--runs 7]

1. First start: `amber serve` on an empty AMBER_HOME (GGUF conversion included) until /health is 200.
2. Second start: the same AMBER_HOME again (cached checkpoint).
3. One request at a time: a 30-token prompt, maxTokens 64 (minTokens 64, greedy, so exactly 64
   tokens), through the HTTP API; the peer is transformers' `generate` on the same fp32 weights,
   in-process (no HTTP), 64 new tokens. Medians over --runs.
Writes bench/results/latency.json and the latency section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AMBER, REPO, free_port, served_kernels, update_doc_section, wait_healthy, write_results  # noqa: E402
PROMPT = ("Amber is a self-hosted language model studio. It serves models over an HTTP API so that "
          "teams can run them on their own")


def start(home: Path) -> tuple[subprocess.Popen, str, float]:
    """`amber serve` on `home`; returns once /health answers 200, with the seconds that took."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    began = time.perf_counter()
    proc = subprocess.Popen([AMBER, "serve", "--port", str(port), "--log-level", "warning"],
                            env={**os.environ, "AMBER_HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(url, proc)
    return proc, url, time.perf_counter() - began


def amber_latency(url: str, key: str, runs: int) -> tuple[list[float], int]:
    body = {"prompt": PROMPT, "maxTokens": 64, "minTokens": 64, "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"}
    times = []
    for _ in range(runs + 1):  # the first is a warm-up
        began = time.perf_counter()
        r = httpx.post(f"{url}/studio/v1/j2-light/complete", json=body, headers=headers, timeout=300)
        times.append(time.perf_counter() - began)
        r.raise_for_status()
    prompt_tokens = len(r.json()["prompt"]["tokens"])
    assert len(r.json()["completions"][0]["data"]["tokens"]) == 64
    return times[1:], prompt_tokens


def transformers_latency(checkpoint: Path, runs: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(checkpoint)(PROMPT, return_tensors="pt").input_ids
    times = []
    with torch.inference_mode():
        for _ in range(runs + 1):
            began = time.perf_counter()
            model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
            times.append(time.perf_counter() - began)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="amber-bench-"))
    try:
        proc, _, first = start(home)
        proc.terminate(); proc.wait()
        proc, url, second = start(home)
        key = subprocess.run([AMBER, "keys", "create", "bench"], env={**os.environ, "AMBER_HOME": str(home)},
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        amber, prompt_tokens = amber_latency(url, key, args.runs)
        kernels = served_kernels(url)
        proc.terminate(); proc.wait()
        peer = transformers_latency(home / "checkpoints" / "smollm2-135m-instruct", args.runs)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    result = {
        "first_start_s": round(first, 2), "second_start_s": round(second, 2),
        "prompt_tokens": prompt_tokens, "max_tokens": 64, "runs": args.runs,
        "amber_http_median_s": round(statistics.median(amber), 3),
        "transformers_generate_median_s": round(statistics.median(peer), 3),
    }
    result["speedup_vs_transformers"] = round(result["transformers_generate_median_s"] / result["amber_http_median_s"], 2)
    write_results(REPO / "bench/results/latency.json", result, kernels)
    update_doc_section("latency", render(result))
    print(json.dumps(result, indent=2))


def render(r: dict) -> str:
    return "\n".join([
        f"Default model and precision, CPU, 2 threads; a {r['prompt_tokens']}-token prompt, maxTokens 64 with",
        "minTokens 64 and temperature 0 (exactly 64 tokens), one request at a time through the HTTP API;",
        "the peer is transformers `generate` on the same checkpoint in fp32, in-process.", "",
        "| measure | Amber | transformers | ratio |", "|---|---|---|---|",
        f"| first start (GGUF conversion included), to `/health` 200 | {r['first_start_s']:.1f} s | | |",
        f"| second start (cached checkpoint) | {r['second_start_s']:.1f} s | | |",
        f"| prompt + 64 tokens, median of {r['runs']} | {r['amber_http_median_s']:.2f} s | "
        f"{r['transformers_generate_median_s']:.2f} s | {r['speedup_vs_transformers']:.2f}x |"])


if __name__ == "__main__":
    main()
