"""Scale-out on one machine: `amber serve --ray` (Ray Serve, engine replicas, adapter-aware routing)
against plain `amber serve`, same weights, same run. Writes bench/results/scale_out.json and the
`scale_out` section of docs/benchmarks.md.

    .venv/bin/python bench/scale_out.py [--models 50] [--requests 400] [--zipf 1.0 1.5]

1. Latency at low load (one request at a time, a ~30-token prompt, 16 greedy tokens): plain
   `amber serve` against the Ray path with one replica, both with one torch thread (the same
   compute, so the difference is the path: proxy -> ingress -> handle -> replica; one thread also
   keeps a busy machine's other processes from stalling an OpenMP team), and with two replicas.
2. Routing: `--models` custom models (random rank-16 adapters, written to the shared files and
   marked trained in the database as a worker would), requests spread Zipf-wise over them, 4 at a
   time, 2 replicas holding 8 adapters each: the share of custom-model requests that reached a
   replica already holding their adapter (the ingress counts them; /health shows it), beside what
   the same 16 slots would hold at best under one shared LRU (simulated on the same sequence).
   Then 25 slots each, room for every model once: a router that spread copies of one adapter over
   both replicas would fall short of the shared-LRU figure there.
3. Failover: base-model traffic, 2 at a time with a client that retries a 503 after its
   Retry-After; the replica decoding is killed: requests failed, time until the first request sent
   after the kill succeeded, and time until Ray has two replicas again.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from common import AMBER, REPO, free_port, update_doc_section, wait_healthy, write_results

HOME = REPO / ".amber-bench/scale-out"
RESULTS = REPO / "bench/results/scale_out.json"
PROMPT = "Summarise in one sentence why the sky looks blue during the day and red at sunset:"


def server(*options: str):
    """`amber serve` on the bench home with `options`; (url, process)."""
    port = free_port()
    proc = subprocess.Popen([AMBER, "serve", "--port", str(port), "--log-level", "warning", "--no-worker", *options],
                            env={**os.environ, "AMBER_HOME": str(HOME)}, stdout=subprocess.DEVNULL,
                            stderr=open(HOME / f"server-{port}.log", "w"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, timeout=600)
    return url, proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)


def prepare_home(models: int) -> tuple[str, list[str]]:
    """A fresh home on the bench's converted checkpoints; a key; `models` trained custom models."""
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    (HOME / "checkpoints").symlink_to(REPO / ".amber-bench/checkpoints")
    (HOME / "kernels").symlink_to(REPO / ".amber-bench/kernels")
    env = {**os.environ, "AMBER_HOME": str(HOME)}
    key = subprocess.run([AMBER, "keys", "create", "bench"], env=env, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    return key, make_custom_models(models)


def make_custom_models(n: int) -> list[str]:
    """`n` custom models of the default model with random rank-16 adapters, stored as a worker
    stores a trained one (its files in the shared storage, its job claimed and completed)."""
    sys.path.insert(0, str(REPO))
    from datetime import timedelta

    from lora_batch import write_adapter

    from amber.cli_home import home_config
    from amber.config import load_registry
    from amber.engine.checkpoint import ensure_checkpoint
    from amber.engine.loader import load_model
    from amber.files import layout, open_storage
    from amber.store.repo import Store

    os.environ["AMBER_HOME"] = str(HOME)
    config = home_config()
    registry = load_registry(config.registry_path)
    spec = registry.models[registry.default]
    model = load_model(ensure_checkpoint(spec, config.checkpoints_dir), "float32", "cpu", tune=False)
    rows = HOME / "rows.jsonl"
    rows.write_text("\n".join(f'{{"prompt": "Item {i}:", "completion": " {i}"}}' for i in range(60)))
    subprocess.run([AMBER, "datasets", "upload", str(rows), "--name", "bench", "--account", "bench"], check=True,
                   env={**os.environ, "AMBER_HOME": str(HOME)}, capture_output=True)
    store, storage = Store.open(config.database_url), open_storage(config)
    account = store.ensure_account("bench")
    (dataset,) = store.datasets.list(account.id)
    names = []
    for i in range(n):
        m = store.custom_models.create(account.id, f"bench-{i}", spec.name, spec.name, dataset, 1e-3, 1, {})
        job = store.jobs.claim("bench:0", lambda w: True, timedelta(hours=1), kinds=["train"])
        with tempfile.TemporaryDirectory() as tmp:
            write_adapter(model, Path(tmp) / "a", seed=i, rank=16, scale=0.02)
            storage.put_dir(layout.adapter(m.id, 1), Path(tmp) / "a")
        store.custom_models.report_epoch(m.id, job.id, "bench:0", [{"epoch": 1}])
        assert store.custom_models.complete(m.id, job.id, "bench:0", 1, None, 0)
        names.append(m.name)
    return names


def complete(url: str, key: str, path: str, tokens: int = 16, retry: bool = False) -> tuple[float, int]:
    """(seconds, final HTTP status) of one greedy completion; `retry`: a 503 is asked again."""
    started = time.perf_counter()
    while True:
        r = httpx.post(f"{url}/studio/v1/{path}/complete", headers={"Authorization": f"Bearer {key}"},
                       json={"prompt": PROMPT, "maxTokens": tokens, "minTokens": tokens, "temperature": 0},
                       timeout=600)
        if r.status_code != 503 or not retry:
            return time.perf_counter() - started, r.status_code
        time.sleep(float(r.headers.get("retry-after", 1)))


def low_load_p50(url: str, key: str, n: int) -> dict:
    complete(url, key, "j2-light")  # warm
    times = [complete(url, key, "j2-light")[0] for _ in range(n)]
    return {"p50_ms": 1000 * statistics.median(times), "p90_ms": 1000 * sorted(times)[int(0.9 * n)]}


def zipf_picks(models: list[str], n: int, s: float, seed: int = 0) -> list[str]:
    weights = [1 / (k + 1) ** s for k in range(len(models))]
    return random.Random(seed).choices(models, weights, k=n)


def best_lru_share(picks: list[str], slots: int) -> float:
    """Hits of one LRU of `slots` (all replicas' slots as one cache) on the same sequence."""
    held: collections.OrderedDict = collections.OrderedDict()
    hits = 0
    for p in picks:
        hits += p in held
        held[p] = None
        held.move_to_end(p)
        if len(held) > slots:
            held.popitem(last=False)
    return hits / len(picks)


def routing(url: str, key: str, models: list[str], n: int, s: float, slots: int) -> dict:
    picks = zipf_picks(models, n, s)
    before = health(url)["engines"]["smollm2-135m-instruct"]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda m: complete(url, key, f"j2-light/{m}", 8), picks))
    elapsed = time.perf_counter() - started
    after = health(url)["engines"]["smollm2-135m-instruct"]
    asked = after["adapter_requests"] - before["adapter_requests"]
    held = after["adapter_already_held"] - before["adapter_already_held"]
    return {"zipf_s": s, "requests": n, "distinct_models": len(set(picks)), "ok": sum(c == 200 for _, c in results),
            "held_share": held / asked, "best_lru_share": best_lru_share(picks, slots),
            "p50_ms": 1000 * statistics.median(t for t, _ in results), "seconds": elapsed}


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()


def live_replicas(url: str) -> dict[int, dict]:
    return {r["pid"]: r for r in health(url).get("replicas", {}).values() if Path(f"/proc/{r['pid']}").exists()}


def failover(url: str, key: str) -> dict:
    """Two clients loop on 64-token base-model requests, retrying a 503 after its Retry-After; the
    replica decoding is killed 5 s in, the clients stop 20 s after that."""
    log: list[tuple[float, float, int]] = []   # (sent, answered, status), retries included in the time
    killed_at = [float("inf")]

    def client() -> None:
        while time.perf_counter() < killed_at[0] + 20:
            sent = time.perf_counter()
            took, status = complete(url, key, "j2-light", 64, retry=True)
            log.append((sent, sent + took, status))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(5)
    busy = [pid for pid, r in live_replicas(url).items() if r["engines"]["smollm2-135m-instruct"]["running_samples"]]
    os.kill(busy[0], signal.SIGKILL)
    killed_at[0] = killed = time.perf_counter()
    replaced = None
    while replaced is None and time.perf_counter() - killed < 300:
        pids = live_replicas(url)
        if len(pids) == 2 and busy[0] not in pids:
            replaced = time.perf_counter() - killed
        time.sleep(0.2)
    for t in threads:
        t.join()
    cut = [e for e in log if e[0] < killed < e[1]]   # in flight at the kill: answered after a retry
    after = sorted(e for e in log if e[0] > killed)
    return {"requests": len(log), "failed": sum(e[2] != 200 for e in log),
            "in_flight_at_kill_s": [round(e[1] - killed, 2) for e in cut],
            "first_success_after_kill_s": (after[0][1] - killed) if after else None, "replacement_s": replaced}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--zipf", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--latency-requests", type=int, default=30)
    args = parser.parse_args()
    key, models = prepare_home(args.models)
    result = {"models": args.models, "replicas": 2, "adapter_slots": 8}

    url, proc = server("--threads", "1")
    try:
        result["plain"] = low_load_p50(url, key, args.latency_requests)
    finally:
        stop(proc)
    for replicas, slots in ((1, 8), (2, 8), (2, 25)):
        url, proc = server("--ray", "--replicas", str(replicas), "--adapter-slots", str(slots), "--threads", "1")
        try:
            if slots == 8:
                result[f"ray_{replicas}"] = low_load_p50(url, key, args.latency_requests)
            if replicas == 2 and slots == 8:
                result["routing"] = [routing(url, key, models, args.requests, s, 2 * slots) for s in args.zipf]
                result["failover"] = failover(url, key)
            if slots == 25:  # room for every model once: does routing keep one copy of each?
                # (more requests: with 400, the first request of each model alone caps the share at ~88%)
                result["routing_roomy"] = routing(url, key, models, 3 * args.requests, args.zipf[0], 2 * slots)
        finally:
            stop(proc)
    write_results(RESULTS, result)
    update_doc_section("scale_out", table(result))
    print(table(result))


def table(r: dict) -> str:
    plain, one, two = r["plain"]["p50_ms"], r["ray_1"]["p50_ms"], r["ray_2"]["p50_ms"]
    rows = ["| measure | figure | goal |", "|---|---|---|",
            f"| p50, one request at a time, plain `amber serve --threads 1` | {plain:.0f} ms | |",
            f"| p50, Ray path, 1 replica of 1 thread | {one:.0f} ms ({one / plain - 1:+.0%}) | at most +10% |",
            f"| p50, Ray path, 2 replicas of 1 thread | {two:.0f} ms ({two / plain - 1:+.0%}) | |"]
    for z in r["routing"]:
        rows.append(f"| Zipf s={z['zipf_s']} over {r['models']} custom models ({z['distinct_models']} asked), "
                    f"2 replicas x 8 slots: requests reaching a replica already holding their adapter | "
                    f"{z['held_share']:.0%} (one shared LRU of 16 at best: {z['best_lru_share']:.0%}) | at least 90% |")
    z = r["routing_roomy"]
    rows.append(f"| the same with 25 slots a replica (room for all {r['models']}), {z['requests']} requests: "
                f"Zipf s={z['zipf_s']} | "
                f"{z['held_share']:.0%} (one shared LRU of 50: {z['best_lru_share']:.0%}) | at least 90% |")
    f = r["failover"]
    rows += [f"| failover: requests that failed (clients retry a 503 after its Retry-After) | {f['failed']} of "
             f"{f['requests']} | |",
             f"| failover: requests in flight at the kill, answered (after their retry) this long after it | "
             f"{', '.join(f'{s:.1f} s' for s in f['in_flight_at_kill_s'])} | |",
             f"| failover: first answer to a request sent after the kill | {f['first_success_after_kill_s']:.1f} s | |",
             f"| failover: two replicas again (Ray's replacement loaded) | {f['replacement_s']:.1f} s | |"]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
