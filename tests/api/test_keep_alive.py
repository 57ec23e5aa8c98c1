"""Idle keep-alive connections stay open as hosted APIs keep them (75 s by default, `amber serve
--keep-alive`), so pooling clients (the SDKs, LangChain's cached async client) do not meet closed
sockets between calls. uvicorn's own default closed them after 5 s."""
from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.slow


def get(sock: socket.socket, host: str) -> bytes:
    sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_an_idle_connection_outlives_uvicorns_five_seconds(server):
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        assert get(sock, url.netloc).startswith(b"HTTP/1.1 200")
        time.sleep(7)
        assert get(sock, url.netloc).startswith(b"HTTP/1.1 200")  # the same socket, still open
