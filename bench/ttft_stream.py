"""Time to first streamed token through the HTTP API, for each streaming endpoint.

    .venv/bin/python bench/ttft_stream.py [--runs 15]

`amber serve` with the default registry (default model and precision) on AMBER_HOME=.amber-bench.
A request goes out on a kept-alive connection; the clock stops at the first SSE event that carries
generated text (not the role-only event chat streams open with). Every run has its own ~30-token
prompt (consecutive words of the SST-2 sample's sentences), so neither the prefix cache nor a
repeated prompt helps. Measured idle, and again while 8 other streams are decoding (a new request joins their
batch). Medians (and p90) over --runs, after two warm-up requests per endpoint. On a shared
machine the figures mean little while another process computes (two torch threads on two busy
cores slow down many times over), so the share of CPU time used by other processes during the run
is measured and reported beside them.
Writes bench/results/ttft_stream.json and the ttft-stream section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, amber_server, served_kernels, update_doc_section, write_results  # noqa: E402

HOME = REPO / ".amber-bench"
WORDS = [word for name in ("train", "dev", "test")
         for line in (REPO / f"tests/data/sst2/{name}.tsv").read_text().splitlines()
         for word in line.split("\t")[-1].split()]
STRIDE = 25  # words per prompt: ~30 tokens
NO_EOS = {"2": -100}  # the background streams must not end early


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time used so far by process `pid` (with its threads), or by the whole machine."""
    if pid is None:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
        busy = user + nice + system + irq + softirq + steal
    else:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        busy = int(fields[11]) + int(fields[12])  # utime + stime
    return busy / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """The share of the machine's CPU that processes other than this one and the server use."""

    def __init__(self, server_pid: int):
        self.pid, self.began = server_pid, time.monotonic()
        self.machine, self.ours = cpu_seconds(), self._ours()

    def _ours(self) -> float:
        return cpu_seconds(self.pid) + cpu_seconds(os.getpid())

    def share(self) -> float:
        foreign = (cpu_seconds() - self.machine) - (self._ours() - self.ours)
        return round(max(0.0, foreign) / ((time.monotonic() - self.began) * os.cpu_count()), 3)


def prompt(i: int) -> str:
    """The i-th distinct prompt."""
    assert (i + 1) * STRIDE <= len(WORDS), "not enough distinct prompts: fewer --runs"
    return " ".join(WORDS[i * STRIDE:(i + 1) * STRIDE])


def body(endpoint: str, text: str, max_tokens: int) -> dict:
    if endpoint == "/v1/completions":
        return {"model": "j2-light", "prompt": text, "max_tokens": max_tokens, "temperature": 0}
    return {"model": "j2-light", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0}


def first_token(client: httpx.Client, endpoint: str, payload: dict) -> tuple[float, int]:
    """Seconds to the first event with generated text, and the prompt's token count."""
    began, ttft = time.perf_counter(), None
    usage = {"stream_options": {"include_usage": True}} if endpoint.startswith("/v1") else {}
    with client.stream("POST", endpoint, json={**payload, "stream": True, **usage}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text and ttft is None:
                    ttft = time.perf_counter() - began
            if event.get("usage"):
                prompt_tokens = event["usage"]["prompt_tokens"]
    return ttft, prompt_tokens


def background(url: str, key: str, count: int, stop: threading.Event) -> list[threading.Thread]:
    """`count` long greedy streams, each restarted when it ends, until `stop`."""
    def run(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
            while not stop.is_set():
                payload = {"model": "j2-light", "prompt": prompt(200 + i), "max_tokens": 400, "temperature": 0,
                           "logit_bias": NO_EOS, "stream": True}
                with client.stream("POST", "/v1/completions", json=payload) as r:
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads


def measure(client: httpx.Client, endpoint: str, runs: int, first: int) -> dict:
    """TTFT over prompts first .. first + runs + 1 (the first two warm up)."""
    for i in range(2):
        first_token(client, endpoint, body(endpoint, prompt(first + i), 4))
    results = [first_token(client, endpoint, body(endpoint, prompt(first + 2 + i), 4)) for i in range(runs)]
    times = sorted(t for t, _ in results)
    return {"median_s": statistics.median(times), "p90_s": times[int(0.9 * (len(times) - 1))],
            "prompt_tokens": statistics.median(n for _, n in results)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the server on the way out
    (HOME / "models.toml").unlink(missing_ok=True)  # always today's default registry
    endpoints = ["/v1/completions", "/v1/chat/completions", "/studio/v1/chat/completions"]
    result: dict = {"runs": args.runs, "idle": {}, "beside_8_streams": {}}
    result["foreign_cpu_share"] = {}
    with amber_server(HOME) as (url, key, server):
        kernels = served_kernels(url)
        foreign = ForeignLoad(server.pid)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
            for k, endpoint in enumerate(endpoints):
                result["idle"][endpoint] = measure(client, endpoint, args.runs, (args.runs + 2) * k)
            result["foreign_cpu_share"]["idle"] = foreign.share()
            stop = threading.Event()
            threads = background(url, key, 8, stop)
            time.sleep(3)  # all 8 decoding
            foreign = ForeignLoad(server.pid)
            try:
                for k, endpoint in enumerate(endpoints):
                    result["beside_8_streams"][endpoint] = measure(client, endpoint, args.runs,
                                                                   (args.runs + 2) * (3 + k))
            finally:
                result["foreign_cpu_share"]["beside_8_streams"] = foreign.share()
                stop.set()
                for t in threads:
                    t.join(30)
    if max(result["foreign_cpu_share"].values()) > 0.05:
        print(f"warning: other processes used CPU during the run: {result['foreign_cpu_share']}", file=sys.stderr)
    write_results(REPO / "bench/results/ttft_stream.json", result, kernels)
    update_doc_section("ttft-stream", render(result))
    print(json.dumps(result, indent=2))


def render(r: dict) -> str:
    rows = ["Default model and precision, CPU, 2 threads. Clock: request sent on a kept-alive connection ->",
            "first SSE event with generated text. Prompts ~30 tokens, each run its own (no prefix-cache hits);",
            "a chat prompt also holds the chat template's tokens (SmolLM2's default system prompt included).",
            f"Median (p90) of {r['runs']} runs. Other processes' share of the CPU meanwhile: "
            f"{r['foreign_cpu_share']['idle']:.0%} (idle), {r['foreign_cpu_share']['beside_8_streams']:.0%} (beside).",
            "",
            "| endpoint | prompt tokens (BOS included) | idle | beside 8 decoding streams |", "|---|---|---|---|"]
    for endpoint, idle in r["idle"].items():
        busy = r["beside_8_streams"][endpoint]
        rows.append(f"| `POST {endpoint}` (stream) | {idle['prompt_tokens']:.0f} | "
                    f"{idle['median_s'] * 1000:.0f} ms ({idle['p90_s'] * 1000:.0f}) | "
                    f"{busy['median_s'] * 1000:.0f} ms ({busy['p90_s'] * 1000:.0f}) |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
