"""Data generation over HTTP against a live server and its real worker (on the tiny random model, so
a job takes seconds): every refusal is a 422 before any job exists; a job's rows are generated,
flagged, reviewed and saved as a dataset that trains; cancelling stops it; a worker killed mid-job
is replaced and the job resumes after its last row, with no row written twice; other accounts see
nothing of it."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SST2 = [json.loads(line) for line in (REPO / "tests/data/sst2/train.jsonl").read_text().splitlines()]
SEEDS = SST2[:4]
INPUTS = [r["prompt"] for r in SST2[8:68]]  # 60: a saved dataset needs 50 rows


def post(server, body: dict, key: str | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/studio/v1/dataset/generate", timeout=60, json=body,
                      headers={"Authorization": f"Bearer {key or server.key}"})


def get(server, path: str, key: str | None = None, **params) -> httpx.Response:
    return httpx.get(f"{server.url}/studio/v1/dataset/generate{path}", params=params, timeout=30,
                     headers={"Authorization": f"Bearer {key or server.key}"})


def wait(server, job_id: str, until=("COMPLETED", "FAILED", "CANCELLED"), timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while (job := get(server, f"/{job_id}").json())["status"] not in until:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def inputs_job(**extra) -> dict:
    return {"mode": "inputs", "model": "tiny", "examples": SEEDS, "inputs": INPUTS, "maxTokens": 4, **extra}


@pytest.mark.parametrize("change, field", [
    ({"examples": []}, "examples"),                                   # fewer than 1 example
    ({"examples": [{"prompt": "x"}]}, "examples"),                    # an example without its completion
    ({"examples": SST2[:8] * 3, "maxTokens": 200}, "examples"),       # k examples do not fit the context
    ({"mode": "examples", "inputs": None, "n": 2001}, "n"),           # N above the cap
    ({"mode": "examples", "inputs": None}, "n"),                      # examples mode without N
    ({"inputs": None}, "inputs"),
    ({"model": "j9-giant"}, "model"),                                 # an unknown model
    ({"mode": "sideways"}, "mode"),
    ({"samples": 9}, "samples"),
])
def test_a_request_that_cannot_run_is_a_422_and_starts_no_job(server, change, field):
    before = get(server, "").json()
    body = inputs_job()
    for k, v in change.items():
        body.pop(k) if v is None else body.__setitem__(k, v)
    r = post(server, body)
    assert r.status_code == 422, r.text
    assert any(field in e["loc"] for e in r.json()["detail"]), r.json()
    assert get(server, "").json() == before


@pytest.fixture(scope="module")
def finished(server):
    r = post(server, inputs_job(samples=3, temperature=1.0, maxTokens=2))
    assert r.status_code == 200, r.text
    return wait(server, r.json()["id"])


def test_a_job_generates_flags_and_reports(server, finished):
    assert finished["status"] == "COMPLETED", finished
    result = finished["result"]
    assert result["generated"] == len(INPUTS) and 0 <= result["kept"] <= len(INPUTS)
    rows = get(server, f"/{finished['id']}/rows", limit=100).json()
    assert rows["total"] == len(INPUTS) and [r["index"] for r in rows["rows"]] == list(range(1, 61))
    for row, text in zip(rows["rows"], INPUTS):
        assert row["input"] == text and len(row["samples"]) == 3 and 0 < row["confidence"] <= 1
        assert row["included"] == (not row["flags"]) and len(row["details"]) == len(row["flags"])
    kept = get(server, f"/{finished['id']}/rows", view="kept").json()["total"]
    assert kept == result["kept"]


def test_review_then_save_makes_a_dataset_that_trains(server, finished):
    job = finished["id"]
    url = f"{server.url}/studio/v1/dataset/generate/{job}/rows"
    h = server.headers
    assert httpx.patch(f"{url}/1", headers=h, json={"decision": "reject"}).json()["included"] is False
    edited = httpx.patch(f"{url}/2", headers=h, json={"output": " positive"}).json()
    assert edited["output"] == " positive" and edited["edited"] and edited["included"]
    assert httpx.patch(f"{url}/3", headers=h, json={"decision": "approve"}).json()["included"] is True
    assert httpx.patch(f"{url}/99", headers=h, json={"decision": "approve"}).status_code == 404
    assert httpx.patch(f"{url}/3", headers=h, json={"decision": "maybe"}).status_code == 422
    for row in get(server, f"/{job}/rows", view="rejected", limit=100).json()["rows"]:
        if row["index"] != 1:  # the reviewer lets in every flagged row but the first
            assert httpx.patch(f"{url}/{row['index']}", headers=h, json={"decision": "approve"}).status_code == 200
    included = [r for r in get(server, f"/{job}/rows", limit=100).json()["rows"] if r["included"]]
    assert len(included) == len(INPUTS) - 1
    r = httpx.post(f"{server.url}/studio/v1/dataset/generate/{job}/save", headers=h, timeout=60,
                   json={"dataset_name": "generated-sst2", "split_ratio": 0})
    assert r.status_code == 200, r.text
    dataset = r.json()
    assert dataset["numExamples"] == len(included)
    rows = httpx.get(f"{server.url}/studio/v1/dataset/{dataset['id']}/rows", headers=h, params={"limit": 100}).json()
    # as an upload would (whitespace corrections approved: the separator is made the common one)
    assert [(x["prompt"], x["completion"].strip()) for x in rows["rows"]] == \
           [(x["input"], x["output"].strip()) for x in included]
    again = httpx.post(f"{server.url}/studio/v1/dataset/generate/{job}/save", headers=h,
                       json={"dataset_name": "generated-sst2"})
    assert again.status_code == 422 and again.json()["detail"][0]["loc"] == ["body", "dataset_name"]


def test_other_accounts_see_nothing_of_a_job(server, finished):
    job = finished["id"]
    assert get(server, f"/{job}", key=server.other_key).status_code == 404
    assert get(server, f"/{job}/rows", key=server.other_key).status_code == 404
    assert job not in [j["id"] for j in get(server, "", key=server.other_key).json()]
    r = httpx.patch(f"{server.url}/studio/v1/dataset/generate/{job}/rows/1", json={"decision": "approve"},
                    headers={"Authorization": f"Bearer {server.other_key}"})
    assert r.status_code == 404


def long_job(server) -> str:
    r = post(server, {"mode": "examples", "model": "tiny", "examples": SEEDS, "n": 2000, "maxTokens": 12,
                      "temperature": 1.0})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_a_cancelled_job_stops(server):
    job = long_job(server)
    wait(server, job, until=("RUNNING",))
    while not (get(server, f"/{job}").json()["progress"] or {}).get("rowsDone"):
        time.sleep(0.1)
    r = httpx.post(f"{server.url}/studio/v1/jobs/{job}/cancel", headers=server.headers)
    assert r.status_code == 200, r.text
    done = wait(server, job)
    assert done["status"] == "CANCELLED"
    # the worker stops after the chunk in hand (written, then refused at its report): the count settles
    deadline, before = time.monotonic() + 60, -1
    while (written := get(server, f"/{job}/rows").json()["total"]) != before:
        assert time.monotonic() < deadline
        before = written
        time.sleep(3)
    assert 0 < written <= 32 * 3  # at most a chunk (2 batches of 16) or two past the cancel


def test_a_worker_killed_mid_job_is_replaced_and_the_job_resumes(server):
    r = post(server, {"mode": "examples", "model": "tiny", "examples": SEEDS, "n": 160, "maxTokens": 8,
                      "temperature": 1.0})
    job = r.json()["id"]
    while (get(server, f"/{job}").json()["progress"] or {}).get("rowsDone", 0) < 32:
        time.sleep(0.05)
    with sqlite3.connect(server.home / "amber.db") as db:
        (worker,) = db.execute("select worker from jobs where id = ?", (int(job),)).fetchone()
    os.kill(int(worker.rpartition(":")[2]), signal.SIGKILL)
    done = wait(server, job, timeout=300)
    assert done["status"] == "COMPLETED", done
    rows = []
    for offset in range(0, 160, 100):
        rows += get(server, f"/{job}/rows", offset=offset, limit=100).json()["rows"]
    assert [r["index"] for r in rows] == list(range(1, 161))
    with sqlite3.connect(server.home / "amber.db") as db:
        (finisher,) = db.execute("select worker from jobs where id = ?", (int(job),)).fetchone()
    assert finisher != worker
