"""What the studio's pages read besides the AI21 API: a page of a dataset's rows, a custom model's
adapter as a zip, and the k-shot prompt its compare page sets against it. One 1-epoch model on the
tiny random model (trained by the server's own worker in seconds)."""
from __future__ import annotations

import io
import json
import sqlite3
import zipfile

import httpx
import pytest
from safetensors.torch import load

from amber.engine.tokenizer import Tokenizer
from amber.evaluation import Example, few_shot_prompt, separator_for
from tests.api.test_custom_models import SST2, train, upload, wait_for

pytestmark = pytest.mark.slow


def get(server, path: str, key: str | None = None, **params) -> httpx.Response:
    return httpx.get(f"{server.url}/studio/v1{path}", params=params, timeout=60,
                     headers={"Authorization": f"Bearer {key or server.key}"})


def few_shot(server, model_id: str, key: str | None = None, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/studio/v1/custom-model/{model_id}/few-shot", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key or server.key}"})


@pytest.fixture(scope="module")
def model(server):
    d = upload(server, "sst2-pages", SST2.read_bytes(), "train.jsonl")
    assert d.status_code == 200, d.text
    m = train(server, d.json()["id"], "pages", 1, learning_rate=0.002)
    done = wait_for(server, m["id"])
    assert done["status"] == "COMPLETED", done
    return d.json(), done


def test_dataset_rows_page_by_split(server, model):
    dataset, _ = model
    first = get(server, f"/dataset/{dataset['id']}/rows", limit=5).json()
    assert first["total"] == dataset["numExamples"] and len(first["rows"]) == 5
    assert set(first["rows"][0]) == {"row", "split", "prompt", "completion", "messages"}
    train = get(server, f"/dataset/{dataset['id']}/rows", split="train", offset=2, limit=3).json()
    assert train["total"] == dataset["trainNumExamples"]
    assert [r["split"] for r in train["rows"]] == ["train"] * 3
    everything = get(server, f"/dataset/{dataset['id']}/rows", split="train", limit=500).json()["rows"]
    assert everything[2:5] == train["rows"]
    validation = get(server, f"/dataset/{dataset['id']}/rows", split="validation").json()
    assert validation["total"] == dataset["validationNumExamples"] == len(validation["rows"])


@pytest.mark.parametrize("params, field", [({"limit": 0}, "limit"), ({"limit": 501}, "limit"),
                                           ({"offset": -1}, "offset"), ({"split": "test"}, "split")])
def test_bad_row_queries_name_the_field(server, model, params, field):
    r = get(server, f"/dataset/{model[0]['id']}/rows", **params)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", field]


def test_export_is_a_zip_of_the_peft_adapter(server, model):
    _, m = model
    r = get(server, f"/custom-model/{m['id']}/export")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"] == 'attachment; filename="pages-epoch1.zip"'
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads(archive.read("adapter_config.json"))
    assert config["peft_type"] == "LORA"
    weights = load(archive.read("adapter_model.safetensors"))
    assert weights and all("lora_" in name for name in weights)
    assert get(server, f"/custom-model/{m['id']}/export", epoch=1).content == r.content


def test_export_refuses_untrained_epochs(server, model):
    _, m = model
    r = get(server, f"/custom-model/{m['id']}/export", epoch=2)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "epoch"]
    assert get(server, f"/custom-model/{m['id']}/export", epoch=0).status_code == 422
    with sqlite3.connect(server.home / "amber.db") as db:  # the same model, failed before any epoch
        cols = [c[1] for c in db.execute("PRAGMA table_info(custom_models)") if c[1] != "id"]
        values = {"name": "'never-trained'", "status": "'FAILED'", "current_epoch": "NULL",
                  "default_epoch": "NULL", "worker": "NULL", "epochs": "'[]'"}
        picked = ", ".join(values.get(c, c) for c in cols)
        new_id = db.execute(f"INSERT INTO custom_models ({', '.join(cols)}) SELECT {picked} FROM custom_models "
                            "WHERE id = ?", (int(m["id"]),)).lastrowid
    r = get(server, f"/custom-model/{new_id}/export")
    assert r.status_code == 409 and "no trained epoch" in r.json()["detail"]


def test_another_account_gets_404s(server, model):
    dataset, m = model
    assert get(server, f"/dataset/{dataset['id']}/rows", key=server.other_key).status_code == 404
    assert get(server, f"/custom-model/{m['id']}/export", key=server.other_key).status_code == 404
    assert few_shot(server, m["id"], key=server.other_key, prompt="x").status_code == 404
    assert few_shot(server, "999999", prompt="x").status_code == 404


def test_few_shot_prompt_is_the_first_train_rows_then_the_prompt(server, model):
    dataset, m = model
    rows = get(server, f"/dataset/{dataset['id']}/rows", split="train", limit=64).json()["rows"]
    examples = [Example(r["prompt"], r["completion"]) for r in rows]
    prompt = "Review: a film about nothing\nSentiment:"
    r = few_shot(server, m["id"], prompt=prompt, shots=3)
    assert r.status_code == 200, r.text
    sep = separator_for(examples)
    assert r.json() == {"prompt": few_shot_prompt(examples[:3], prompt, sep), "shots": 3, "separator": sep,
                        "stopSequences": [sep], "baseModel": "tiny", "maxTokens": 16}
    assert few_shot(server, m["id"], prompt=prompt, shots=0).json()["prompt"] == prompt


def test_few_shot_uses_fewer_shots_when_the_context_is_short(server, model, tiny_checkpoint):
    _, m = model
    prompt, max_tokens, context = "Review: long enough\nSentiment:", 150, 256  # tiny's max_context
    body = few_shot(server, m["id"], prompt=prompt, shots=64, maxTokens=max_tokens).json()
    tokens = len(Tokenizer.from_pretrained(tiny_checkpoint).encode(body["prompt"]))
    assert 0 < body["shots"] < 64 and 1 + tokens + max_tokens <= context
    r = few_shot(server, m["id"], prompt="word " * 300)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]


@pytest.mark.parametrize("body, field", [({}, "prompt"), ({"prompt": "x", "shots": 65}, "shots"),
                                         ({"prompt": "x", "maxTokens": 0}, "maxTokens"),
                                         ({"prompt": "x", "extra": 1}, "extra")])
def test_bad_few_shot_bodies_name_the_field(server, model, body, field):
    r = few_shot(server, model[1]["id"], **body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", field]


def test_few_shot_after_the_dataset_is_deleted_is_a_409(server, model):  # last: it deletes the dataset
    dataset, m = model
    assert httpx.delete(f"{server.url}/studio/v1/dataset/{dataset['id']}", headers=server.headers).status_code == 200
    r = few_shot(server, m["id"], prompt="x")
    assert r.status_code == 409 and "deleted" in r.json()["detail"]
