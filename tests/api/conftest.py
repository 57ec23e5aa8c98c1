"""A live `amber serve` (a real uvicorn process on a free port) shared by the API tests.

Its AMBER_HOME is a temporary directory whose registry points at the already-converted default
model, plus the tiny random model for tests that only need *a* model.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

AMBER = Path(sys.executable).parent / "amber"


@dataclass
class Server:
    url: str
    key: str
    other_key: str
    home: Path

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_key(env: dict, account: str) -> str:
    out = subprocess.run([AMBER, "keys", "create", account], env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def registry(default_checkpoint: Path, tiny_checkpoint: Path, default: str = "smollm2-135m-instruct",
             gemma_checkpoint: Path | None = None) -> str:
    """`gemma_checkpoint`: also the second general model, as j2-mid in its registry precision (int8)."""
    gemma = f'''[models.gemma-3-270m]
aliases = ["j2-mid"]
path = "{gemma_checkpoint}"
dtype = "int8"
max_context = 2048
''' if gemma_checkpoint else ""
    return f'''default = "{default}"
[models.smollm2-135m-instruct]
aliases = ["j2-light", "j1-large"]
path = "{default_checkpoint}"
max_context = 2048
[models.tiny]
path = "{tiny_checkpoint}"
max_context = 256
''' + gemma


@contextmanager
def live_server(home: Path, registry_text: str, *args: str, ready_within: float = 120):
    """`amber serve` on a free port with AMBER_HOME=home, healthy, with keys for alice and bob."""
    (home / "models.toml").write_text(registry_text)
    env = {**os.environ, "AMBER_HOME": str(home)}
    port = free_port()
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([AMBER, "serve", "--port", str(port), "--log-level", "warning", *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        keys = create_key(env, "alice"), create_key(env, "bob")
        deadline = time.monotonic() + ready_within
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server did not become healthy in {ready_within} s"
            time.sleep(0.3)
        yield Server(url, keys[0], keys[1], home)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="session")
def server(default_checkpoint, tiny_checkpoint, gemma_checkpoint, tmp_path_factory):
    text = registry(default_checkpoint, tiny_checkpoint, gemma_checkpoint=gemma_checkpoint)
    with live_server(tmp_path_factory.mktemp("amber-home"), text) as s:
        yield s


@pytest.fixture(scope="session")
def bare_server(default_checkpoint, tiny_checkpoint, tmp_path_factory):
    """A second server, without a worker and logging at info, for tests that need a registry of their
    own (tests/api/test_bad_models.py, test_health_kernels.py): default `tiny4` (the tiny model in
    int4, loaded at start), j2-light (the real default model), and two entries it cannot serve."""
    home = tmp_path_factory.mktemp("bare-home")
    bert = home / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert", "vocab_size": 10}')
    text = f'''default = "tiny4"
[models.tiny4]
path = "{tiny_checkpoint}"
dtype = "int4"
max_context = 256
[models.smollm2-135m-instruct]
aliases = ["j2-light"]
path = "{default_checkpoint}"
max_context = 2048
[models.bert]
path = "{bert}"
[models.gone]
gguf_path = "{home / 'nowhere.gguf'}"
'''
    with live_server(home, text, "--no-worker", "--log-level", "info") as s:
        yield s
