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
