"""Dataset uploads against a live server: nothing lost, nothing half-kept, nothing leaked.

The client's file name never becomes a path; a failed upload leaves no row and no directory; ids
are never reused, across accounts or not; an upload is refused on its headers before its body is
read, and stopped at the limit when it has no length; AMBER_HOME stays private to its owner.
"""
from __future__ import annotations

import json
import os
import select
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from amber.api.studio.datasets import MAX_BODY_BYTES
from tests.api.conftest import create_key

REPO = Path(__file__).resolve().parents[2]
SST2 = (REPO / "tests/data/sst2/train.jsonl").read_bytes()
AMBER = Path(sys.executable).parent / "amber"


@pytest.fixture(scope="module")
def keys(server) -> tuple[str, str]:
    """Two accounts of this module's own, so the shared server's alice and bob see none of it."""
    env = {**os.environ, "AMBER_HOME": str(server.home)}
    return create_key(env, "carol-uploads"), create_key(env, "dave-uploads")


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def multipart(filename: bytes, content: bytes, **fields: str) -> tuple[bytes, str]:
    """A form built by hand, so the file name's bytes reach the server exactly as given."""
    boundary = "amber-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="dataset_file"; filename="'.encode()
                 + filename + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(server, key: str, name: str, content: bytes = SST2, filename: bytes = b"train.jsonl"):
    body, content_type = multipart(filename, content, dataset_name=name)
    return httpx.post(f"{server.url}/studio/v1/dataset", content=body, timeout=120,
                      headers={**auth(key), "Content-Type": content_type})


def rows(n: int, tag: str = "") -> bytes:
    return "".join(json.dumps({"prompt": f"{tag}Item {i}:", "completion": f" {i % 7}"}) + "\n"
                   for i in range(n)).encode()


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- 1. the upload kept byte for byte, under names Amber chooses ---

def test_a_file_named_rows_jsonl_is_kept_byte_for_byte(server, keys):
    r = upload(server, keys[0], "named-rows", filename=b"rows.jsonl")
    assert r.status_code == 200, r.text
    body = r.json()
    directory = server.home / "datasets" / body["id"]
    assert names(directory) == ["rows.jsonl", "upload.jsonl"]
    assert (directory / "upload.jsonl").read_bytes() == SST2
    parsed = [json.loads(line) for line in (directory / "rows.jsonl").read_text().splitlines()]
    assert len(parsed) == 100 and parsed[0]["row"] == 1
    assert body["fileName"] == "rows.jsonl" and body["sizeBytes"] == len(SST2)


@pytest.mark.parametrize("filename, shown", [
    (b"data\x00.jsonl", "data.jsonl"),
    (b"..", "dataset"),
    (b"../../../../etc/passwd", "passwd"),
    (b"C:\\\\Users\\\\me\\\\train.jsonl", "train.jsonl"),
    (b"two\tlines.jsonl", "twolines.jsonl"),
    (b"", "dataset"),
])
def test_hostile_file_names_are_metadata_only(server, keys, filename, shown):
    r = upload(server, keys[0], f"hostile-{filename.hex()}", filename=filename)
    assert r.status_code == 200, r.text
    assert r.json()["fileName"] == shown
    assert names(server.home / "datasets" / r.json()["id"]) == ["rows.jsonl", "upload.jsonl"]


def test_a_300_character_name_is_shortened_for_display_keeping_its_extension(server, keys):
    r = upload(server, keys[0], "long-name", filename=b"x" * 300 + b".csv", content=b"prompt,completion\n" + b"".join(
        f"Q{i}:, a{i}\n".encode() for i in range(60)))
    assert r.status_code == 200, r.text
    shown = r.json()["fileName"]
    assert len(shown) == 128 and shown.endswith("….csv")
    assert names(server.home / "datasets" / r.json()["id"]) == ["rows.jsonl", "upload.csv"]


def test_a_failed_store_leaves_no_row_no_directory_and_no_path_in_the_answer(server, keys):
    with sqlite3.connect(server.home / "amber.db") as db:
        (last,) = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'datasets'").fetchone() or (0,)
    blocker = server.home / "datasets" / str(last + 1)
    blocker.parent.mkdir(exist_ok=True)
    blocker.write_text("not a directory")  # the rename into place fails on it
    try:
        r = upload(server, keys[0], "blocked")
        assert r.status_code == 500
        assert str(server.home) not in r.text and "/" not in r.json()["detail"]
    finally:
        blocker.unlink()
    listed = httpx.get(f"{server.url}/studio/v1/dataset", headers=auth(keys[0])).json()
    assert "blocked" not in [d["datasetName"] for d in listed]
    assert not (server.home / "datasets" / str(last + 1)).exists()
    assert not [p for p in (server.home / "datasets").iterdir() if p.name.startswith(".incoming")]
    again = upload(server, keys[0], "blocked")  # the name was never taken
    assert again.status_code == 200, again.text


@pytest.mark.parametrize("content, content_type, status, field", [
    (b'{"dataset_name": "x"}', "application/json", 422, "dataset_file"),
    (b"--b\r\nContent-Disposition: form-data; name=\"dataset_name\"\r\n\r\nx\r\n--b--\r\n",
     "multipart/form-data; boundary=b", 422, "dataset_file"),
    (multipart(b"a.jsonl", SST2)[0], multipart(b"", b"")[1], 422, "dataset_name"),
    (b"--b\r\nno headers end here", "multipart/form-data; boundary=b", 400, None),
    (b"garbage before any boundary", "multipart/form-data; boundary=b", 400, None),
])
def test_malformed_forms_are_4xx_naming_the_field(server, keys, content, content_type, status, field):
    r = httpx.post(f"{server.url}/studio/v1/dataset", content=content, timeout=60,
                   headers={**auth(keys[0]), "Content-Type": content_type})
    assert r.status_code == status, r.text
    if field:
        assert r.json()["detail"][0]["loc"] == ["body", field]


# --- 2. ids are never reused; a dataset counts only its own account's models ---

@pytest.fixture(scope="module")
def trained(server, keys) -> tuple[dict, dict]:
    """carol's dataset and a 1-epoch custom model on it (tiny), trained by the server's worker."""
    dataset = upload(server, keys[0], "reuse-probe", rows(60, "reuse ")).json()
    model = httpx.post(f"{server.url}/studio/v1/custom-model", headers=auth(keys[0]), timeout=30,
                       json={"dataset_id": dataset["id"], "model_name": "reuse-probe", "model_type": "tiny",
                             "num_epochs": 1}).json()
    deadline = time.monotonic() + 600
    while (model := httpx.get(f"{server.url}/studio/v1/custom-model/{model['id']}",
                              headers=auth(keys[0])).json())["status"] not in ("COMPLETED", "FAILED"):
        assert time.monotonic() < deadline, model
        time.sleep(0.3)
    assert model["status"] == "COMPLETED", model
    return dataset, model


def test_ids_are_not_reused_across_accounts_and_a_deleted_dataset_is_reported(server, keys, trained):
    carol, dave = auth(keys[0]), auth(keys[1])
    first, model = trained
    assert model["datasetDeleted"] is False
    assert httpx.get(f"{server.url}/studio/v1/dataset/{first['id']}", headers=carol).json()["numModelsUsed"] == 1
    assert httpx.delete(f"{server.url}/studio/v1/dataset/{first['id']}", headers=carol).status_code == 200

    theirs = upload(server, keys[1], "after-delete", rows(60, "dave ")).json()
    assert int(theirs["id"]) > int(first["id"]) and theirs["numModelsUsed"] == 0
    m = httpx.get(f"{server.url}/studio/v1/custom-model/{model['id']}", headers=carol).json()
    assert m["datasetId"] == int(first["id"]) and m["datasetDeleted"] is True
    mine = upload(server, keys[0], "after-delete", rows(60, "carol ")).json()
    assert int(mine["id"]) > int(theirs["id"]) and mine["numModelsUsed"] == 0
    assert [d["numModelsUsed"] for d in httpx.get(f"{server.url}/studio/v1/dataset", headers=dave).json()] == [0]


# --- 3. refused on the headers; stopped at the limit ---

def _raw(server, head: str, first: bytes = b"") -> socket.socket:
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(head.encode() + first)
    return sock


def _answer(sock: socket.socket, timeout: float = 10) -> tuple[int, str]:
    """The status and the whole response, which must come within `timeout` seconds."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return int(data.split(b" ", 2)[1]), data.decode("latin-1")


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return next((int(line.split(":")[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 0)


def _post_head(key: str | None, length: int | None, expect: bool = False) -> str:
    lines = ["POST /studio/v1/dataset HTTP/1.1", "Host: test",
             "Content-Type: multipart/form-data; boundary=b"]
    lines += [f"Authorization: Bearer {key}"] if key else []
    lines += [f"Content-Length: {length}"] if length is not None else ["Transfer-Encoding: chunked"]
    lines += ["Expect: 100-continue"] if expect else []
    return "\r\n".join(lines) + "\r\n\r\n"


@pytest.mark.parametrize("expect", [True, False])
def test_no_key_is_a_401_before_the_body(server, expect):
    """200 MB declared; with `Expect: 100-continue` nothing is sent, without it 1 MB; either way the
    401 comes at once, while the rest was never sent."""
    with _raw(server, _post_head(None, 200 * 2**20, expect), b"" if expect else b"-" * 2**20) as sock:
        status, response = _answer(sock)
    assert status == 401 and "www-authenticate: bearer" in response.lower()
    assert json.loads(response.split("\r\n\r\n", 1)[1])["detail"].startswith("missing API key")


def test_a_declared_length_over_the_limit_is_a_413_before_the_body(server, keys):
    with _raw(server, _post_head(keys[0], 200 * 2**20, expect=True)) as sock:
        status, response = _answer(sock)
    assert status == 413 and "MiB" in json.loads(response.split("\r\n\r\n", 1)[1])["detail"]


def test_a_chunked_body_is_stopped_at_the_limit(server, keys):
    chunk = b"x" * 2**20
    sent = 0
    with _raw(server, _post_head(keys[0], None)) as sock:
        head = b'--b\r\nContent-Disposition: form-data; name="dataset_file"; filename="big.jsonl"\r\n\r\n'
        sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
        while not select.select([sock], [], [], 0)[0]:
            assert sent < 3 * MAX_BODY_BYTES, "no answer while 3x the limit was sent"
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
        status, _ = _answer(sock)
    assert status == 413
    assert MAX_BODY_BYTES - 2**20 < sent < MAX_BODY_BYTES + 16 * 2**20  # socket buffers hold a few MB


def test_more_rows_than_the_cap_is_a_422_naming_the_file(server, keys):
    r = upload(server, keys[0], "too-many", rows(100_001, "cap "))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "dataset_file"] and "100,000 rows" in detail["msg"]


# --- 5. AMBER_HOME private to its owner ---

def _open_to_others(home: Path, skip: tuple[str, ...] = ()) -> list[str]:
    found = []
    for root, dirs, files in os.walk(home):
        for name in dirs + files:
            path = Path(root, name)
            if path.relative_to(home).as_posix() not in skip and stat.S_IMODE(path.lstat().st_mode) & 0o077:
                found.append(f"{path.relative_to(home)} {oct(stat.S_IMODE(path.lstat().st_mode))}")
    return found


def test_the_servers_home_and_all_it_writes_are_private(server, trained):
    """Database (with -wal, -shm), dataset files, adapters written by the worker process. The
    test harness itself wrote models.toml and server.log."""
    assert stat.S_IMODE(server.home.stat().st_mode) == 0o700
    written = {p.name for p in server.home.iterdir()}
    assert {"amber.db", "amber.db-wal", "amber.db-shm", "datasets", "custom-models"} <= written
    assert list((server.home / "custom-models").rglob("adapter_model.safetensors"))
    assert _open_to_others(server.home, skip=("models.toml", "server.log")) == []


def test_an_existing_home_is_made_private(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    out = subprocess.run([AMBER, "keys", "create", "alice"], env={**os.environ, "AMBER_HOME": str(home)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert _open_to_others(home) == []
    fresh = tmp_path / "new" / "home"
    assert subprocess.run([AMBER, "models"], env={**os.environ, "AMBER_HOME": str(fresh)},
                          capture_output=True, timeout=120).returncode == 0
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700 and _open_to_others(fresh) == []


@pytest.mark.parametrize("content, filename, at_fault", [
    (rows(3) + b'{"prompt": "x", "completion": ""}\n' + rows(2) + b'{"prompt": "", "completion": "y"}\n',
     b"half.jsonl", [4, 7]),
    (rows(2) + b"not json\n", b"bad.jsonl", [3]),
    (b"prompt,completion\na,b\nc,d,e\n", b"wide.csv", [2]),
    (rows(1) + b'{"messages": [{"role": "user", "content": "hi"}]}\n', b"mixed.jsonl", [2]),
])
def test_a_refused_upload_names_every_row_at_fault(server, content, filename, at_fault):
    """Besides the sentence (which cites the first few), `rows` lists each row to fix, so a page can
    show them one by one."""
    r = upload(server, server.key, "refused", content, filename)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "dataset_file"] and error["rows"] == at_fault
