"""Training while serving: does a custom-model job keep moving under saturating load, and what does
it cost the requests? Amber's policy (amber/threads.py) against the previous one, in one run.

    .venv/bin/python bench/train_under_load.py [--clients 16] [--load-s 75] [--idle-train-s 40]

One `amber serve` (with its training worker) on a fresh AMBER_HOME, default model and precision.
Load: --clients concurrent clients, each looping a greedy 32-token completion (minTokens 32) of an
SST-2 review through the J2 API; latencies count requests sent after a 5 s ramp.
1. serving alone: p50 / p95 latency under load.
2. the previous policy (the peer): a worker-like process trains with train_lora at nice 15 with a
   thread per core, as `amber worker` did, beside the same load; the engine keeps every core, since
   nothing tells it a job trains. Steps done within --peer-s after the load starts.
3. training alone: a real job (SST-2's 300 rows, no validation split, 10 epochs) through the API
   and the worker; its step rate from the progress the API reports, over --idle-train-s.
4. both: the same job under the same load, Amber's policy in force (on 2 cores: the worker
   computes on one thread, the engine on the other, and between steps the worker pauses so that it
   computes 45% of the time, the engine back on both meanwhile); step rate (pauses included) and
   latencies after a 5 s switch-over.
5. serving alone again, the job deleted: the baseline is the mean of 1 and 5, so drift between the
   phases does not pass for an effect of training.
Targets: training under load keeps >= 1/4 of its idle step rate; serving's p50 stays <= 1.3x its
p50 without training. Other processes' share of the CPU is measured in each phase (a shared
machine makes these figures noisy). Writes bench/results/train_under_load.json and the
train-under-load section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, amber_server, served_kernels, update_doc_section, write_results  # noqa: E402

from amber.threads import CoreShare  # noqa: E402

SST2 = REPO / "tests/data/sst2"
RESULTS = REPO / "bench/results/train_under_load.json"
CHECKPOINTS = REPO / ".amber-bench/checkpoints"  # converted once, shared with the other benchmarks
RAMP_S = 5.0
JOB_EPOCHS = 10


def rows() -> list[dict]:
    return [json.loads(line) for name in ("train", "dev", "test")
            for line in (SST2 / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def cpu_info() -> dict:
    info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in
                                             Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)}
    flags = set(info.get("flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"model": info.get("model name", "?"), "cores": len(os.sched_getaffinity(0)),
            "flags": [f for f in wanted if f in flags]}


class ForeignLoad:
    """The share of the machine's CPU used by processes other than ours (this one, the server and
    its children, any trainer we started)."""

    def __init__(self, *pids: int):
        self.pids = pids
        self.began, self.machine, self.ours = time.monotonic(), self._machine(), self._ours()

    @staticmethod
    def _machine() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def _ours(self) -> float:
        procs: dict[int, psutil.Process] = {}
        for pid in self.pids:
            try:
                proc = psutil.Process(pid)
                procs.update((p.pid, p) for p in [proc, *proc.children(recursive=True)])
            except psutil.NoSuchProcess:
                pass
        total = 0.0
        for p in procs.values():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def share(self) -> float:
        foreign = (self._machine() - self.machine) - (self._ours() - self.ours)
        return round(max(0.0, foreign) / ((time.monotonic() - self.began) * psutil.cpu_count()), 3)


class Load:
    """`clients` concurrent clients looping 32-token completions on a thread of its own, until stopped."""

    def __init__(self, url: str, key: str, clients: int):
        self.url, self.key, self.clients = url, key, clients
        self.prompts = [r["prompt"] for r in rows()]
        self.done: list[tuple[float, float]] = []  # (sent, seconds) of each answered request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self.began = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    async def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        limits = httpx.Limits(max_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=600, limits=limits) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(self.clients)))

    async def _client(self, http: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            body = {"prompt": self.prompts[(i * 7 + n) % len(self.prompts)], "maxTokens": 32, "minTokens": 32,
                    "temperature": 0}
            sent = time.monotonic()
            r = await http.post("/studio/v1/j2-light/complete", json=body)
            r.raise_for_status()
            self.done.append((sent, time.monotonic() - sent))
            n += 1

    def latencies(self) -> dict:
        """p50 / p95 of the requests sent after the ramp."""
        seconds = sorted(s for sent, s in self.done if sent >= self.began + RAMP_S)
        assert seconds, "no request answered: lengthen --load-s"
        if len(seconds) < 20:
            print(f"warning: only {len(seconds)} requests answered in a phase", file=sys.stderr)
        return {"requests": len(seconds), "p50_s": round(statistics.median(seconds), 3),
                "p95_s": round(seconds[int(0.95 * (len(seconds) - 1))], 3)}


def serve_alone(url: str, key: str, pid: int, args) -> dict:
    foreign = ForeignLoad(os.getpid(), pid)
    with Load(url, key, args.clients) as load:
        time.sleep(RAMP_S + args.load_s)
    return {**load.latencies(), "foreign_cpu_share": foreign.share()}


def previous_policy(url: str, key: str, pid: int, checkpoint: Path, args) -> dict:
    """The peer: a trainer at nice 15 with torch's default threads beside the load."""
    trainer = subprocess.Popen([sys.executable, __file__, "--trainer", str(checkpoint)], stdout=subprocess.PIPE,
                               text=True, bufsize=1)
    steps: list[float] = []  # monotonic times at which steps ended
    reader = threading.Thread(target=lambda: steps.extend(float(line) for line in trainer.stdout), daemon=True)
    reader.start()
    try:
        while len(steps) < 4:  # loaded, and a few steps timed alone
            assert trainer.poll() is None, "the trainer process died"
            time.sleep(0.1)
        idle_step = (steps[-1] - steps[1]) / (len(steps) - 2)
        foreign = ForeignLoad(os.getpid(), pid, trainer.pid)
        with Load(url, key, args.clients) as load:
            start = time.monotonic() + RAMP_S
            time.sleep(RAMP_S + args.peer_s)
            during = [t for t in steps if t >= start]
        share = foreign.share()  # while the trainer still counts as ours
    finally:
        trainer.kill()
        trainer.wait()
    step = args.peer_s / len(during) if during else None
    return {**load.latencies(), "idle_step_s": round(idle_step, 3), "steps_under_load": len(during),
            "window_s": args.peer_s, "step_under_load_s": step and round(step, 3), "foreign_cpu_share": share}


def trainer_main(checkpoint: Path) -> None:
    """As `amber worker` trained before the split: nice 15, a thread per core; prints each step's end."""
    from amber.training.lora import Example, TrainConfig, train_lora

    os.nice(15)
    examples = [Example(r["prompt"], r["completion"]) for r in rows()]
    with tempfile.TemporaryDirectory() as out:
        train_lora(checkpoint, examples, [], TrainConfig(epochs=JOB_EPOCHS), Path(out),
                   on_progress=lambda _: print(time.monotonic(), flush=True))


class Job:
    """A real custom-model job through the API; its step count as the API reports it over time."""

    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=f"{url}/studio/v1", headers={"Authorization": f"Bearer {key}"},
                                 timeout=60)
        content = "\n".join(json.dumps(r) for r in rows()).encode()
        r = self.http.post("/dataset", files={"dataset_file": ("sst2.jsonl", content)},
                           data={"dataset_name": "sst2-all", "split_ratio": "0"})
        r.raise_for_status()
        r = self.http.post("/custom-model", json={"dataset_id": r.json()["id"], "model_name": "load",
                                                  "model_type": "j2-light", "num_epochs": JOB_EPOCHS})
        r.raise_for_status()
        self.id = r.json()["id"]

    def step(self) -> int:
        model = self.http.get(f"/custom-model/{self.id}").json()
        assert model["status"] not in ("COMPLETED", "FAILED"), f"the job ended too soon: {model['status']}"
        return (model.get("progress") or {}).get("step", 0)

    def step_seconds(self, window: float) -> float | None:
        """Seconds per step over `window` s: from the first step change seen to the last; None
        when fewer than two changes were seen (steps slower than half the window)."""
        first = last = None
        stop = time.monotonic() + window
        seen = self.step()
        while time.monotonic() < stop:
            time.sleep(0.25)
            step = self.step()
            if step != seen:
                seen, last = step, (time.monotonic(), step)
                first = first or last
        if not first or last[1] == first[1]:
            print(f"warning: fewer than two progress reports in {window:.0f} s", file=sys.stderr)
            return None
        return round((last[0] - first[0]) / (last[1] - first[1]), 3)


def train_and_serve(url: str, key: str, home: Path, pid: int, args) -> tuple[dict, dict]:
    job = Job(url, key)
    while job.step() < 3:  # the model is loaded and steps run
        time.sleep(0.25)
    foreign = ForeignLoad(os.getpid(), pid)
    idle = {"step_s": job.step_seconds(args.idle_train_s), "window_s": args.idle_train_s,
            "foreign_cpu_share": foreign.share()}
    assert idle["step_s"], "training alone made no progress: lengthen --idle-train-s"
    foreign = ForeignLoad(os.getpid(), pid)
    with Load(url, key, args.clients) as load:
        time.sleep(RAMP_S)
        step = job.step_seconds(args.load_s)
    both = {**load.latencies(), "step_s": step, "window_s": args.load_s,
            "foreign_cpu_share": foreign.share()}
    job.http.delete(f"/custom-model/{job.id}").raise_for_status()
    deadline = time.monotonic() + 120
    while CoreShare(home, 1).is_training():  # the worker drops the job at its next report
        assert time.monotonic() < deadline, "the worker kept training a deleted job"
        time.sleep(0.25)
    return idle, both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (the batch holds 16)")
    parser.add_argument("--load-s", type=float, default=75, help="measured seconds of each loaded phase")
    parser.add_argument("--peer-s", type=float, default=40, help="seconds of the previous policy under load")
    parser.add_argument("--idle-train-s", type=float, default=40, help="seconds of training alone")
    parser.add_argument("--no-peer", action="store_true", help="skip the previous policy")
    parser.add_argument("--trainer", type=Path, help=argparse.SUPPRESS)  # the peer's own process
    args = parser.parse_args()
    if args.trainer:
        return trainer_main(args.trainer)
    result = summarize({"cpu": cpu_info(), "clients": args.clients, "max_tokens": 32, **run_phases(args)})
    write_results(RESULTS, result, result.pop("kernels", None))
    update_doc_section("train-under-load", render(result))
    print(json.dumps(result, indent=2))


def run_phases(args) -> dict:
    home = Path(tempfile.mkdtemp(prefix="amber-bench-"))
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    (home / "checkpoints").symlink_to(CHECKPOINTS)
    result = {}
    try:
        with amber_server(home) as (url, key, server):
            httpx.post(f"{url}/studio/v1/j2-light/complete", headers={"Authorization": f"Bearer {key}"},
                       json={"prompt": "Review: warm\nSentiment:", "maxTokens": 32}, timeout=300).raise_for_status()
            result["kernels"] = served_kernels(url)
            result["serving_alone"] = serve_alone(url, key, server.pid, args)
            if not args.no_peer:
                checkpoint = CHECKPOINTS / "smollm2-135m-instruct"
                result["previous_policy"] = previous_policy(url, key, server.pid, checkpoint, args)
            result["training_alone"], result["both"] = train_and_serve(url, key, home, server.pid, args)
            result["serving_alone_after"] = serve_alone(url, key, server.pid, args)  # drift, if any
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return result


def summarize(r: dict) -> dict:
    """The two ratios against the targets; serving alone is the mean of the phases before and after."""
    alone_p50 = (r["serving_alone"]["p50_s"] + r["serving_alone_after"]["p50_s"]) / 2
    r["training_kept"] = round(r["training_alone"]["step_s"] / (r["both"]["step_s"] or math.inf), 3)
    r["p50_ratio"] = round(r["both"]["p50_s"] / alone_p50, 3)
    r["targets_met"] = r["training_kept"] >= 0.25 and r["p50_ratio"] <= 1.3
    return r


def seconds_per_step(step: float | None, at_least: float) -> str:
    return f"{step:.2f}" if step else f"> {at_least:.0f} (too few steps)"


def latency(phase: dict) -> str:
    return f"{phase['p50_s']:.2f} s ({phase['p95_s']:.2f})"


def render(r: dict) -> str:
    alone, after, idle, both = r["serving_alone"], r["serving_alone_after"], r["training_alone"], r["both"]
    about = (f"{r['cpu']['model']}, {r['cpu']['cores']} cores ({', '.join(r['cpu']['flags'])}); default model "
             f"and precision; {r['clients']} clients looping 32-token completions. Training: a real job (300 "
             "rows, batch 8) through the worker, seconds per step (pauses included) from the progress the API "
             "reports. Other processes' share of the CPU in each phase in the last column.")
    rows = [textwrap.fill(about, 100), "",
            "| phase | training s/step | serving p50 (p95) | other load |", "|---|---|---|---|",
            f"| serving alone | | {latency(alone)} | {alone['foreign_cpu_share']:.0%} |",
            f"| training alone | {idle['step_s']:.2f} | | {idle['foreign_cpu_share']:.0%} |",
            f"| both, Amber's policy | {seconds_per_step(both['step_s'], both['window_s'] / 2)} | {latency(both)} "
            f"| {both['foreign_cpu_share']:.0%} |",
            f"| serving alone again, job deleted | | {latency(after)} | {after['foreign_cpu_share']:.0%} |"]
    if "previous_policy" in r:
        p = r["previous_policy"]
        rows.append(f"| both, previous policy (trainer nice 15, every core each; {p['idle_step_s']:.2f} s/step "
                    f"alone) | {seconds_per_step(p['step_under_load_s'], p['window_s'])} | {latency(p)} "
                    f"| {p['foreign_cpu_share']:.0%} |")
    verdict = (f"Training under load keeps {r['training_kept']:.0%} of its idle step rate (target >= 25%); "
               f"serving p50 is {r['p50_ratio']:.2f}x its p50 without training (the mean of before and after; "
               "target <= 1.3x).")
    return "\n".join([*rows, "", textwrap.fill(verdict, 100)])


if __name__ == "__main__":
    main()
