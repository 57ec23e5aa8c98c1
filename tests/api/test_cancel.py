"""A client that goes away frees its place in the batch."""
from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

pytestmark = pytest.mark.slow


def running(server) -> int:
    engines = httpx.get(f"{server.url}/health").json()["engines"]
    return sum(e["running_samples"] + e["prefilling"] + e["waiting"] for e in engines.values())


def test_disconnect_aborts_the_generation(server):
    assert running(server) == 0
    body = json.dumps({"prompt": "Count forever:", "maxTokens": 1500, "minTokens": 1500, "numResults": 2}).encode()
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(b"POST /studio/v1/j2-light/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {server.key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while running(server) == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    sock.close()
    gone = time.monotonic()
    while running(server) > 0:
        assert time.monotonic() - gone < 5, "the abandoned request kept its place in the batch"
        time.sleep(0.05)
    # the engine still serves
    r = httpx.post(f"{server.url}/studio/v1/j2-light/complete", headers=server.headers, timeout=60,
                   json={"prompt": "Hi", "maxTokens": 2})
    assert r.status_code == 200


def engine_stats(server) -> dict:
    return httpx.get(f"{server.url}/health").json()["engines"]["smollm2-135m-instruct"]


NO_EOS = {"logit_bias": {"2": -100}}  # <|im_end|> banned: the generation cannot end by itself
COUNT = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]  # greedy: 100+ tokens


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "j2-light", "prompt": "Count forever:", "max_tokens": 1500, **NO_EOS}),
    ("/v1/chat/completions", {"model": "j2-light", "max_tokens": 1500, "n": 3, "messages": COUNT, **NO_EOS}),
    ("/studio/v1/chat/completions", {"model": "j2-light", "max_tokens": 1500, "temperature": 0, "messages": COUNT}),
])
def test_closing_a_stream_frees_the_batch_within_a_step(server, path, body):
    """Read a few events of a stream, hang up, and the engine drops the generation at its next
    step: the engine's step counter moves on by at most two (the step running when the client
    hung up, and the one that drops it) before the batch is empty."""
    assert running(server) == 0
    data = json.dumps({**body, "stream": True}).encode()
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                 + f"Authorization: Bearer {server.key}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    received = b""
    while received.count(b"data: ") < 6:  # the role chunk(s), then tokens: generation is under way
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    assert engine_stats(server)["running_samples"] == body.get("n", 1)
    steps = engine_stats(server)["steps"]
    sock.close()
    deadline = time.monotonic() + 5
    while running(server) > 0:
        assert time.monotonic() < deadline, ("the abandoned stream kept its place in the batch", engine_stats(server))
        time.sleep(0.01)
    assert engine_stats(server)["steps"] - steps <= 2
