"""Two replicas: two `amber serve`s with AMBER_HOMEs of their own, one AMBER_SHARED_DIR and one
database. A dataset uploaded through the first is trained by the second's worker and served by
both, each filling its adapter cache once; deleting the model through the second makes the first
answer 404 and drop its copy, on disk and in its engine."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.api.conftest import live_server, registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas(default_checkpoint, tiny_checkpoint, tmp_path_factory):
    shared, first, second = (tmp_path_factory.mktemp(name) for name in ("shared", "replica-a", "replica-b"))
    text = registry(default_checkpoint, tiny_checkpoint, default="tiny")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AMBER_SHARED_DIR", str(shared))
        with live_server(first, text, "--no-worker") as a:
            # one database: b's amber.db is a link to a's (SQLite follows it for its -wal and -shm)
            (second / "amber.db").symlink_to(first / "amber.db")
            with live_server(second, text) as b:
                yield a, b, shared


def adapter_copies(home) -> list:
    return sorted((home / "cache/adapters").rglob("@*"))


def ask(server, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/studio/v1/tiny/{model}/complete", headers=server.headers, timeout=60,
                      json={"prompt": "Item 3:", "maxTokens": 2, "temperature": 0})


def adapters_loaded(server) -> int:
    return httpx.get(f"{server.url}/health").json()["engines"]["tiny"]["adapters_loaded"]


def test_one_replica_trains_what_another_took_in_and_both_serve_it(replicas):
    a, b, shared = replicas
    rows = "".join(json.dumps({"prompt": f"Item {i}:", "completion": f" {i % 5}"}) + "\n" for i in range(50))
    d = httpx.post(f"{a.url}/studio/v1/dataset", headers=a.headers, timeout=60, data={
        "dataset_name": "shared", "split_ratio": "0"}, files={"dataset_file": ("d.jsonl", rows.encode())})
    assert d.status_code == 200, d.text
    assert (shared / "datasets" / d.json()["id"] / "upload.jsonl").read_text() == rows
    model = httpx.post(f"{a.url}/studio/v1/custom-model", headers=a.headers, timeout=30, json={
        "dataset_id": d.json()["id"], "model_name": "everywhere", "model_type": "tiny", "num_epochs": 1}).json()
    deadline = time.monotonic() + 120
    while (got := httpx.get(f"{a.url}/studio/v1/custom-model/{model['id']}", headers=a.headers).json()
           )["status"] not in ("COMPLETED", "FAILED"):
        assert time.monotonic() < deadline, got
        time.sleep(0.3)
    assert got["status"] == "COMPLETED", got  # by b's worker: a runs none
    assert (shared / "custom-models" / model["id"] / "epoch-1" / "adapter_model.safetensors").is_file()
    assert not any((home / name).exists() for home in (a.home, b.home) for name in ("datasets", "custom-models"))

    assert ask(a, "everywhere").status_code == 200
    (copy,) = adapter_copies(a.home)
    inode = (copy / "adapter_model.safetensors").stat().st_ino
    assert ask(a, "everywhere").status_code == 200 and ask(b, "everywhere").status_code == 200
    assert adapter_copies(a.home) == [copy] and (copy / "adapter_model.safetensors").stat().st_ino == inode
    assert len(adapter_copies(b.home)) == 1 and adapters_loaded(a) == 1

    assert httpx.delete(f"{b.url}/studio/v1/custom-model/{model['id']}", headers=b.headers).status_code == 200
    assert adapter_copies(b.home) == [] and adapters_loaded(b) == 0  # the deleting replica: at once
    assert not (shared / "custom-models" / model["id"]).exists()
    deadline = time.monotonic() + 30
    while adapter_copies(a.home) or adapters_loaded(a):  # the other: at its next sweep
        assert ask(a, "everywhere").status_code == 404
        assert time.monotonic() < deadline, "replica a kept the deleted model's adapter"
        time.sleep(0.5)
