"""Datasets and custom models over HTTP against a live server and its real training worker (on the
tiny random model, so training takes seconds): upload, train, serve per epoch, privacy, a worker
killed with SIGKILL mid-training, export to PEFT."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SST2 = REPO / "tests/data/sst2/train.jsonl"
AMBER = Path(sys.executable).parent / "amber"


def upload(server, name: str, content: bytes, filename: str = "data.jsonl", key: str | None = None, **form):
    return httpx.post(f"{server.url}/studio/v1/dataset", timeout=60,
                      headers={"Authorization": f"Bearer {key or server.key}"},
                      files={"dataset_file": (filename, content)}, data={"dataset_name": name, **form})


def synthetic(n: int) -> bytes:
    words = ["red", "green", "blue", "black", "white"]
    return "\n".join(json.dumps({"prompt": f"Item {i} colour:", "completion": f" {words[i % 5]}"})
                     for i in range(n)).encode()


def wait_for(server, model_id: str, status=("COMPLETED", "FAILED"), timeout=180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{server.url}/studio/v1/custom-model/{model_id}", headers=server.headers).json()
        if body["status"] in status:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.3)


def train(server, dataset_id: str, name: str, epochs: int, **extra) -> dict:
    r = httpx.post(f"{server.url}/studio/v1/custom-model", headers=server.headers, timeout=30,
                   json={"dataset_id": dataset_id, "model_name": name, "model_type": "tiny",
                         "num_epochs": epochs, **extra})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def trained(server):
    """SST-2's 100 training rows (90 train / 10 validation), a 2-epoch custom model on `tiny`."""
    d = upload(server, "sst2", SST2.read_bytes(), "train.jsonl")
    assert d.status_code == 200, d.text
    model = train(server, d.json()["id"], "sentiment", 2, learning_rate=0.002)
    return d.json(), wait_for(server, model["id"])


def test_the_dataset_is_parsed_split_and_kept_unchanged(server, trained):
    dataset, _ = trained
    assert (dataset["numExamples"], dataset["trainNumExamples"], dataset["validationNumExamples"]) == (100, 90, 10)
    listed = httpx.get(f"{server.url}/studio/v1/dataset", headers=server.headers).json()
    assert dataset["id"] in [d["id"] for d in listed]
    got = httpx.get(f"{server.url}/studio/v1/dataset/{dataset['id']}", headers=server.headers).json()
    assert got["numModelsUsed"] == 1 and got["sizeBytes"] == len(SST2.read_bytes())
    assert (server.home / "datasets" / dataset["id"] / "upload.jsonl").read_bytes() == SST2.read_bytes()
    assert dataset["fileName"] == "train.jsonl"  # the client's name: metadata only


@pytest.mark.parametrize("form, field", [
    ({"dataset_name": "few"}, "dataset_file"),                       # 20 rows < 50
    ({"dataset_name": "sst2"}, "dataset_name"),                      # taken (by the fixture)
    ({"dataset_name": "r", "split_ratio": "0.9"}, "split_ratio"),
    ({"dataset_name": "r", "split_ratio": "half"}, "split_ratio"),
    ({"dataset_name": "r", "delete_long_rows": "maybe"}, "delete_long_rows"),
    ({"dataset_name": "r", "selected_columns": '{"prompt": "text"}'}, "selected_columns"),
])
def test_bad_uploads_name_the_field(server, trained, form, field):
    content = synthetic(20) if form["dataset_name"] == "few" else SST2.read_bytes()
    name = form.pop("dataset_name")
    r = upload(server, name, content, **form)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", field], r.text


def test_training_reports_epochs_progress_and_an_evaluation(trained):
    _, model = trained
    assert model["status"] == "COMPLETED", model
    assert [e["epoch"] for e in model["epochs"]] == [1, 2]
    assert all(e["train_loss"] > 0 and e["validation_loss"] > 0 for e in model["epochs"])
    assert model["currentEpoch"] == 2 and model["modelMetadata"]["defaultEpoch"] in (1, 2)
    evaluation = model["evaluation"]
    assert evaluation["examples"] == 10 and 1 <= evaluation["shots"] <= 8  # tiny: a 256-token context
    for side in ("custom_model", "few_shot"):
        assert 0 <= evaluation[side]["accuracy"] <= 1 and evaluation[side]["mean_latency_s"] > 0
    assert evaluation["trainingSeconds"] > 0


def test_each_epoch_is_served_and_differs_from_the_base(server, trained):
    _, model = trained
    ask = lambda path, **extra: httpx.post(f"{server.url}/studio/v1/{path}", headers=server.headers, timeout=60,
                                           json={"prompt": "Review: a fine film\nSentiment:", "maxTokens": 4,
                                                 "temperature": 0, **extra})
    base = ask("tiny/complete").json()
    epochs = [ask("tiny/sentiment/complete", epoch=e).json() for e in (1, 2)]
    default = ask("tiny/sentiment/complete").json()
    logprobs = lambda body: [t["generatedToken"]["logprob"] for t in body["prompt"]["tokens"]]
    assert logprobs(epochs[0]) != pytest.approx(logprobs(base))
    assert logprobs(epochs[0]) != pytest.approx(logprobs(epochs[1]))
    assert logprobs(default) == pytest.approx(logprobs(epochs[model["modelMetadata"]["defaultEpoch"] - 1]))
    assert ask("tiny/sentiment/complete", epoch=3).status_code == 422
    assert ask("j2-light/sentiment/complete").status_code == 404   # trained on tiny, not on this base
    assert ask("tiny/nonexistent/complete").status_code == 404


def test_another_account_sees_none_of_it(server, trained):
    dataset, model = trained
    bob = {"Authorization": f"Bearer {server.other_key}"}
    assert httpx.get(f"{server.url}/studio/v1/dataset", headers=bob).json() == []
    assert httpx.get(f"{server.url}/studio/v1/custom-model", headers=bob).json() == []
    for method, path in [("GET", f"dataset/{dataset['id']}"), ("DELETE", f"dataset/{dataset['id']}"),
                         ("GET", f"custom-model/{model['id']}"), ("DELETE", f"custom-model/{model['id']}")]:
        assert httpx.request(method, f"{server.url}/studio/v1/{path}", headers=bob).status_code == 404, path
    r = httpx.put(f"{server.url}/studio/v1/custom-model/{model['id']}", headers=bob, json={"defaultEpoch": 1})
    assert r.status_code == 404
    r = httpx.post(f"{server.url}/studio/v1/tiny/sentiment/complete", headers=bob, json={"prompt": "x"})
    assert r.status_code == 404
    # bob may use the same names for his own
    assert upload(server, "sst2", SST2.read_bytes(), key=server.other_key).status_code == 200


def test_default_epoch_can_be_changed(server, trained):
    _, model = trained
    url = f"{server.url}/studio/v1/custom-model/{model['id']}"
    assert httpx.put(url, headers=server.headers, json={"defaultEpoch": 5}).status_code == 422
    body = httpx.put(url, headers=server.headers, json={"defaultEpoch": 1}).json()
    assert body["modelMetadata"]["defaultEpoch"] == 1


def test_a_worker_killed_mid_training_is_replaced_and_resumes(server):
    d = upload(server, "many", synthetic(400), split_ratio="0.01").json()  # epochs of seconds: time to kill in
    model = train(server, d["id"], "resumed", 3)
    run_dir = server.home / "custom-models" / model["id"]
    deadline = time.monotonic() + 120
    while not (run_dir / "epoch-1").is_dir():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first_epoch = (run_dir / "epoch-1" / "adapter_model.safetensors").stat().st_mtime_ns
    with sqlite3.connect(server.home / "amber.db") as db:
        (worker,) = db.execute("select worker from jobs where id = ?", (int(model["jobId"]),)).fetchone()
    os.kill(int(worker.rpartition(":")[2]), signal.SIGKILL)
    done = wait_for(server, model["id"])
    assert done["status"] == "COMPLETED", done
    assert [e["epoch"] for e in done["epochs"]] == [1, 2, 3]
    assert (run_dir / "epoch-1" / "adapter_model.safetensors").stat().st_mtime_ns == first_epoch, "epoch 1 redone"
    with sqlite3.connect(server.home / "amber.db") as db:
        (finisher,) = db.execute("select worker from jobs where id = ?", (int(model["jobId"]),)).fetchone()
    assert finisher != worker


def test_export_loads_in_peft_with_the_same_outputs(server, trained, tiny_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = subprocess.run([AMBER, "models", "export", "sentiment", str(tmp_path), "--epoch", "2", "--account", "alice"],
                         env={**os.environ, "AMBER_HOME": str(server.home)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    prompt = "Review: an exported adapter\nSentiment:"
    body = httpx.post(f"{server.url}/studio/v1/tiny/sentiment/complete", headers=server.headers, timeout=60,
                      json={"prompt": prompt, "maxTokens": 0, "epoch": 2}).json()
    tokens = body["prompt"]["tokens"]
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    from amber.engine.tokenizer import Tokenizer
    ids = Tokenizer.from_pretrained(tiny_checkpoint).encode(prompt)
    with torch.inference_mode():
        lp = peft_model(torch.tensor([[1, *ids]])).logits[0].log_softmax(-1)
    expected = [float(lp[i, t]) for i, t in enumerate(ids)]
    assert [t["generatedToken"]["logprob"] for t in tokens] == pytest.approx(expected, abs=1e-4)


def test_custom_models_answer_on_the_openai_api_by_name_and_only_to_their_account(server, trained):
    prompt = "Review: a gentle comedy\nSentiment:"
    v1 = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                    json={"model": "sentiment", "prompt": prompt, "max_tokens": 3, "temperature": 0,
                          "logprobs": 1}).json()
    j2 = httpx.post(f"{server.url}/studio/v1/tiny/sentiment/complete", headers=server.headers, timeout=60,
                    json={"prompt": prompt, "maxTokens": 3, "temperature": 0}).json()
    assert v1["model"] == "sentiment"
    assert v1["choices"][0]["text"] == j2["completions"][0]["data"]["text"]
    got = v1["choices"][0]["logprobs"]["token_logprobs"]  # every generated token, end-of-text included
    assert got and got == pytest.approx(
        [t["generatedToken"]["raw_logprob"] for t in j2["completions"][0]["data"]["tokens"]], abs=1e-4)
    mine = [m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"]]
    bob = {"Authorization": f"Bearer {server.other_key}"}
    theirs = [m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=bob).json()["data"]]
    assert "sentiment" in mine and "sentiment" not in theirs
    r = httpx.post(f"{server.url}/v1/completions", headers=bob, json={"model": "sentiment", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
