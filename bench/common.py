"""Helpers the benchmark scripts share: ports, a live `amber serve`, RSS, the machine a run was on,
results files and the docs table."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
AMBER = Path(sys.executable).parent / "amber"
DOC = REPO / "docs/benchmarks.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    began = time.perf_counter()
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return time.perf_counter() - began
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.perf_counter() - began > timeout:
            raise RuntimeError(f"server at {url} failed to start")
        time.sleep(0.05)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def amber_server(home: Path, *options: str):
    """`amber serve` on AMBER_HOME=home (with `options`) and a fresh key: yields (url, key, process)."""
    env = {**os.environ, "AMBER_HOME": str(home)}
    port = free_port()
    proc = subprocess.Popen([AMBER, "serve", "--port", str(port), "--log-level", "warning", *options], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        key = subprocess.run([AMBER, "keys", "create", "bench"], env=env, capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
        yield url, key, proc
    finally:
        proc.terminate()
        proc.wait()


def update_doc_section(name: str, body: str) -> None:
    """Replace the text between `<!-- bench:NAME -->` markers in docs/benchmarks.md."""
    text = DOC.read_text()
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = time.strftime("%Y-%m-%d")
    block = f"{start}\n_Last run {stamp}._\n\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += "\n" + block + "\n"
    DOC.write_text(text)


# The instruction sets that decide which kernels win (engine/kernels.py): recorded by name in
# every results file, beside a digest of the full flag list.
KEY_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_int8", "amx_bf16")


def machine(kernels: dict | None = None) -> dict:
    """The CPU a run was on (model, the flags that matter, a digest of all), torch, and the
    kernels Amber chose there (`kernels`: model -> layer shape -> path, as /health lists them)."""
    from amber.engine.kernels import machine as engine_machine
    info = engine_machine()
    flags = info["flags"].split()
    return {"cpu": info["cpu"], "flags": [f for f in KEY_FLAGS if f in flags],
            "flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
            "cores": os.cpu_count(), "torch": info["torch"], "torch_kernels": info["capability"],
            "isa_limits": info.get("isa_limits", {}), "amber_kernels": kernels or {}}


def cpu_kind(info: dict) -> str:
    """A file-name slug for a CPU kind: its model and the instruction sets that set its speed."""
    model = re.sub(r"\(R\)|\(TM\)|\bprocessor\b|\bCPU\b|@.*", "", info["cpu"], flags=re.I)
    model = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    flags = set(info["flags"])
    isa = ("amx" if "amx_tile" in flags else "avx512bf16" if "avx512_bf16" in flags
           else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "base")
    # ONEDNN_MAX_CPU_ISA and the like make the same CPU run other kernels: an emulated kind
    limits = "".join(f"-{v.lower()}" for v in info.get("isa_limits", {}).values())
    return f"{model}-{isa}{'-capped' + limits if limits else ''}"


def served_kernels(url: str) -> dict:
    """The kernels a live `amber serve` chose, per loaded model (its /health)."""
    return httpx.get(f"{url}/health", timeout=10).json().get("kernels", {})


def write_results(path: Path, result: dict, kernels: dict | None = None) -> Path:
    """Write a results file with the machine the run was on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(kernels), **result}, indent=2) + "\n")
    return path


def submit_all(engine, requests: list) -> tuple[float, list]:
    """Submit `requests` to an in-process engine at once; (seconds until the last finished, their
    outputs in order)."""
    done, outs = threading.Event(), {}
    began = time.perf_counter()
    for r in requests:
        engine.submit(r, lambda o, rid=r.request_id: (outs.__setitem__(rid, o), len(outs) == len(requests)
                                                       and done.set()))
    done.wait()
    return time.perf_counter() - began, [outs[r.request_id] for r in requests]
