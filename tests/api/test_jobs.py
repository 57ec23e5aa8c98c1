"""Jobs over HTTP against a live server and its worker: a custom model's training is a "train" job,
listed and read at /studio/v1/jobs; cancelling one mid-training fails the model ("cancelled") and
frees the worker for the next job; another account sees none of it."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.api.test_custom_models import synthetic, train, upload, wait_for

pytestmark = pytest.mark.slow


def jobs(server, path: str = "", method: str = "GET", key: str | None = None, **params) -> httpx.Response:
    return httpx.request(method, f"{server.url}/studio/v1/jobs{path}", params=params, timeout=30,
                         headers={"Authorization": f"Bearer {key or server.key}"})


@pytest.fixture(scope="module")
def dataset(server) -> dict:
    d = upload(server, "jobs-colours", synthetic(60))
    assert d.status_code == 200, d.text
    return d.json()


def test_a_custom_models_training_is_a_train_job(server, dataset):
    model = train(server, dataset["id"], "jobs-one", 1)
    queued = jobs(server, f"/{model['jobId']}").json()
    assert queued["kind"] == "train" and queued["status"] in ("QUEUED", "RUNNING", "COMPLETED")
    done = wait_for(server, model["id"])
    assert done["status"] == "COMPLETED", done
    job = jobs(server, f"/{model['jobId']}").json()
    assert set(job) == {"id", "kind", "status", "progress", "result", "failure", "createdAt", "startedAt", "finishedAt"}
    assert (job["status"], job["failure"], job["progress"]) == ("COMPLETED", None, None)
    assert job["result"] == {"custom_model_id": int(model["id"]), "default_epoch": 1}
    assert job["createdAt"] <= job["startedAt"] <= job["finishedAt"]
    assert model["jobId"] in [j["id"] for j in jobs(server, kind="train").json()]
    assert all(j["kind"] == "generate" for j in jobs(server, kind="generate").json())  # other files make some
    assert model["jobId"] not in [j["id"] for j in jobs(server, kind="generate").json()]
    again = jobs(server, f"/{model['jobId']}/cancel", "POST").json()
    assert again == job  # finished: cancelling changes nothing


def test_cancelling_mid_training_fails_the_model_and_frees_the_worker(server, dataset):
    many = upload(server, "jobs-many", synthetic(1200), split_ratio="0.01").json()
    long = train(server, many["id"], "jobs-cancelled", 3)
    deadline = time.monotonic() + 120
    while (job := jobs(server, f"/{long['jobId']}").json())["progress"] is None:
        assert job["status"] in ("QUEUED", "RUNNING") and time.monotonic() < deadline, job
        time.sleep(0.1)
    assert wait_for(server, long["id"], ("TRAINING",))["progress"]["phase"] == "training"
    cancelled = jobs(server, f"/{long['jobId']}/cancel", "POST").json()
    assert cancelled["status"] == "CANCELLED" and cancelled["failure"] == "cancelled" and cancelled["finishedAt"]
    model = wait_for(server, long["id"], ("FAILED",), timeout=5)
    assert model["failure"] == "cancelled"
    # the worker drops it at its next report and takes the next job (a small one: 60 rows, not 1200)
    after = train(server, dataset["id"], "jobs-after", 1)
    assert wait_for(server, after["id"])["status"] == "COMPLETED"
    assert jobs(server, f"/{long['jobId']}").json()["status"] == "CANCELLED"
    assert wait_for(server, long["id"], ("FAILED",), timeout=5)["currentEpoch"] in (None, 1)


def test_another_accounts_jobs_are_not_found(server, dataset):
    model = train(server, dataset["id"], "jobs-private", 1)
    bob = server.other_key
    assert jobs(server, f"/{model['jobId']}", key=bob).status_code == 404
    r = jobs(server, f"/{model['jobId']}/cancel", "POST", key=bob)
    assert r.status_code == 404 and "does not exist" in r.json()["detail"]
    assert model["jobId"] not in [j["id"] for j in jobs(server, key=bob).json()]
    assert jobs(server, "/nope").status_code == 404
    assert jobs(server, f"/{model['jobId']}").json()["status"] != "CANCELLED"
    wait_for(server, model["id"])
