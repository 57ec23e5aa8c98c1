"""A large dataset upload against a live `amber serve`: how long it takes, the server's peak RSS,
and how slow completions get meanwhile.

    .venv/bin/python bench/dataset_upload.py --rows 503905      # ~40 MB of JSONL
    .venv/bin/python bench/dataset_upload.py --rows 100000      # ~9 MB, at the row cap
    .venv/bin/python bench/dataset_upload.py --rows 100000 --pad 350   # ~44 MB, at the row cap

The server runs with no training worker on the test cache's default model (fp32, `.amber-test/`,
made by the test suite's first run). A thread sends a short completion (maxTokens 8, greedy) every
0.25 s before and during the upload. Prints one JSON object; to measure another tree, run it with
PYTHONPATH=that tree (the server is the `amber` entry point, which imports from PYTHONPATH first).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, amber_server, peak_rss_mb  # noqa: E402

CHECKPOINT = REPO / ".amber-test/checkpoints/smollm2-135m-instruct"
WORDS = ["red", "green", "blue", "black", "white", "amber", "grey"]


def write_rows(path: Path, rows: int, pad: int = 0) -> int:
    """`rows` distinct prompt/completion rows of about 90 + `pad` bytes; returns the file's size."""
    padding = " ".join(WORDS * (pad // 30 + 1))[:pad]
    with open(path, "w") as out:
        for i in range(rows):
            out.write(json.dumps({"prompt": f"{padding}Item {i} has which colour and shape?",
                                  "completion": f" {WORDS[i % 7]} {WORDS[i // 7 % 7]} {i}"}) + "\n")
    return path.stat().st_size


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe(url: str, headers: dict, until: threading.Event, latencies: list[float]) -> None:
    while not until.is_set():
        began = time.perf_counter()
        r = httpx.post(f"{url}/studio/v1/j2-light/complete", headers=headers, timeout=600,
                       json={"prompt": "The capital of France is", "maxTokens": 8, "temperature": 0})
        r.raise_for_status()
        latencies.append(time.perf_counter() - began)
        until.wait(0.25)


def summary(latencies: list[float]) -> dict:
    if not latencies:
        return {}
    return {"n": len(latencies), "median_s": round(statistics.median(latencies), 3),
            "max_s": round(max(latencies), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=503_905)
    parser.add_argument("--pad", type=int, default=0, help="characters added to each prompt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home, data = Path(tmp) / "home", Path(tmp) / "big.jsonl"
        home.mkdir()
        (home / "models.toml").write_text(f'default = "smollm2-135m-instruct"\n[models.smollm2-135m-instruct]\n'
                                          f'aliases = ["j2-light"]\npath = "{CHECKPOINT}"\nmax_context = 2048\n')
        size = write_rows(data, args.rows, args.pad)
        with amber_server(home, "--no-worker") as (url, key, proc):
            headers = {"Authorization": f"Bearer {key}"}
            idle: list[float] = []
            for _ in range(8):
                began = time.perf_counter()
                httpx.post(f"{url}/studio/v1/j2-light/complete", headers=headers, timeout=60,
                           json={"prompt": "The capital of France is", "maxTokens": 8, "temperature": 0})
                idle.append(time.perf_counter() - began)
            rss_before = rss_mb(proc.pid)
            busy: list[float] = []
            stop = threading.Event()
            prober = threading.Thread(target=probe, args=(url, headers, stop, busy))
            prober.start()
            began = time.perf_counter()
            with open(data, "rb") as f:
                r = httpx.post(f"{url}/studio/v1/dataset", headers=headers, timeout=1800,
                               files={"dataset_file": ("big.jsonl", f)}, data={"dataset_name": "big"})
            seconds = time.perf_counter() - began
            stop.set()
            prober.join()
            body = r.json()
            print(json.dumps({
                "rows": args.rows, "pad": args.pad, "file_mb": round(size / 1e6, 1), "status": r.status_code,
                "answer": body if r.status_code != 200 else {k: body[k] for k in ("numExamples", "sizeBytes")},
                "upload_s": round(seconds, 1), "rss_before_mb": round(rss_before),
                "peak_rss_mb": round(peak_rss_mb(proc.pid)), "rss_after_mb": round(rss_mb(proc.pid)),
                "completion_idle": summary(idle), "completion_during_upload": summary(busy)}, indent=1))


if __name__ == "__main__":
    main()
