"""Helpers the benchmark scripts share: ports, a live `amber serve`, RSS, the docs table."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
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
