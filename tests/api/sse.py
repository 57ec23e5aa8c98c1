"""Reading a server-sent-event stream the strict way the ai21 SDK does: every non-empty line must
be a `data: ` line, and the last one `[DONE]`."""
from __future__ import annotations

import json

import httpx


def stream_events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", headers=server.headers, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    data = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in data), data
    assert data[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in data[:-1]]


def is_whole_utf8(data: bytes) -> bool:
    """Whether `data` decodes on its own, i.e. splits no character."""
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False
